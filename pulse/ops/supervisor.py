"""Owns the long-running side tasks: starts them, restarts the ones that die, stops them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from pulse.logs import Throttled

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.1
HEALTHY_S = 60.0  # a task that ran this long before it died begins a new streak


class Supervisor:
    def __init__(self, *, max_backoff_s: float = 30.0) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._max_backoff_s = max_backoff_s
        self.restarts: dict[str, int] = {}

    def start(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run()`` under ``name``; if it returns or raises, log it and run it again."""
        if name in self._tasks:
            raise ValueError(f"task {name!r} already running")
        self.restarts[name] = 0
        self._tasks[name] = asyncio.create_task(self._watch(name, run), name=f"pulse:{name}")

    async def _watch(self, name: str, run: Callable[[], Awaitable[None]]) -> None:
        delay = FIRST_DELAY_S
        # An error that lasts (a permission revoked) kills the task at every try: its
        # traceback once, then a line per try at most every 10 s, as docs/operations.md
        # says of such errors (it was a 28-line traceback per try, for ever). A task
        # that ran HEALTHY_S before it died begins a new streak: its traceback again
        # (the first may have left the logs since), and the first delay again.
        died = Throttled(log)
        while True:
            started = time.monotonic()
            try:
                await run()
                log.error("task %s returned; restarting it", name)
            except asyncio.CancelledError:
                raise
            except Exception:
                if time.monotonic() - started >= HEALTHY_S:
                    died, delay = Throttled(log), FIRST_DELAY_S
                died.error("task %s died; restarting it in %.1f s", name, delay)
            self.restarts[name] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_backoff_s)

    def running(self) -> dict[str, bool]:
        return {name: not task.done() for name, task in self._tasks.items()}

    async def stop(self) -> None:
        """Cancel every task, newest first, and wait for each to finish.

        Bound it from outside (``asyncio.timeout``): a task cancelled in the middle of a
        statement to a database that stopped answering does not finish. Cancelled
        itself, ``stop`` cancels the tasks it had not come to, so that none goes on
        working, and leaves those not finished to ``stopping``."""
        try:
            for name in reversed(list(self._tasks)):
                task = self._tasks[name]
                task.cancel()
                await asyncio.wait({task})
                del self._tasks[name]
                if not task.cancelled() and (exc := task.exception()) is not None:
                    log.error("task %s failed while stopping", name, exc_info=exc)
        finally:
            for task in self._tasks.values():
                if not task.cancelling():
                    task.cancel()

    def stopping(self) -> list[str]:
        """The tasks a ``stop`` cut short left cancelled but not finished, newest first."""
        return [name for name, task in reversed(self._tasks.items()) if not task.done()]
