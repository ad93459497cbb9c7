"""Running a client in a terminal: output that never blocks the event loop, and
signals that stop it.

A pipe or terminal whose reader stops reading blocks write(2) until it reads
again. In the event loop's thread that blocks everything, Ctrl-C included: the
loop's signal handlers run between its callbacks, and Python retries a write(2)
that a signal interrupted (PEP 475), so the process sits in the write for as
long as the reader sleeps, or for ever. Here a thread of its own does the
writing, and the loop only ever waits, cancellably, for room in a bounded queue.
With nothing blocking the loop, SIGINT and SIGTERM are handled in the loop
(``run_until_signal``): they cancel the work, which ends at its next await.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import signal
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# Items the thread takes for one write(2) at most: lines go out together when
# they queue up faster than the reader takes them.
BATCH = 256


class Output:
    """Bytes to one file descriptor, written in order by a daemon thread.

    ``write`` waits while ``max_pending`` items are queued (a slow reader still
    slows the producer down); ``write_nowait`` drops instead (for diagnostics).
    Once a write fails (``EPIPE``: the reader went away), ``error`` holds the
    exception and ``write``/``drain`` raise it. Exiting does not wait for the
    thread: what it has not written yet is lost, so ``drain`` first.
    """

    def __init__(self, fd: int, *, max_pending: int = 1024) -> None:
        self.fd = fd
        self.max_pending = max_pending
        self.error: OSError | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._pending = 0  # queued and not written yet; touched in the loop's thread only
        self._progress = asyncio.Event()  # set when items were written, or the output failed
        self._thread = threading.Thread(target=self._run, name=f"output-fd{fd}", daemon=True)
        self._thread.start()

    async def write(self, data: bytes) -> None:
        while self._pending >= self.max_pending and self.error is None:
            await self._wait_for_progress()
        if self.error is not None:
            raise self.error
        self._put(data)

    def write_nowait(self, data: bytes) -> bool:
        """Queue ``data`` unless the queue is full or the output failed; False: dropped."""
        if self.error is not None or self._pending >= self.max_pending:
            return False
        self._put(data)
        return True

    async def drain(self) -> None:
        """Until everything queued so far has been written."""
        while self._pending and self.error is None:
            await self._wait_for_progress()
        if self.error is not None:
            raise self.error

    def _put(self, data: bytes) -> None:
        self._pending += 1
        self._queue.put(data)

    async def _wait_for_progress(self) -> None:
        self._progress.clear()
        await self._progress.wait()

    # In the loop's thread, called from the writing thread.

    def _written(self, count: int) -> None:
        self._pending -= count
        self._progress.set()

    def _failed(self, error: OSError) -> None:
        self.error = error
        self._progress.set()

    # The writing thread.

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < BATCH:
                    batch.append(self._queue.get_nowait())
            try:
                write_all(self.fd, b"".join(batch))
            except OSError as exc:
                self._report(self._failed, exc)
                return
            self._report(self._written, len(batch))

    def _report(self, callback: Callable[[T], None], arg: T) -> None:
        # A closed loop has nobody waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, arg)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            # Someone (a previous program on this terminal?) left it non-blocking.
            select.select([], [fd], [])
            continue
        view = view[written:]


async def run_until_signal(work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work`` in a task of its own until it ends or SIGINT/SIGTERM cancels it (None).

    The handlers run in the event loop, which a signal wakes whichever thread it
    lands on (the loop's wakeup fd). A second signal, while the first one's
    cancellation is still unwinding, kills the process at once.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    received: list[int] = []

    def stop(signum: int) -> None:
        if received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        task.cancel()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop, signum)
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if received and task.cancelled() and not (current and current.cancelling()):
            return None
        raise
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


def one_line(text: str) -> str:
    """A message on one line of a terminal: its whitespace runs (newlines too) as one space."""
    return " ".join(text.split())
