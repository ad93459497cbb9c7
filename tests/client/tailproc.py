"""`pulse tail` as a subprocess: stderr collected as it comes, stdout read line by line
or left in a pipe that nobody reads."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import sys
import termios
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

# The smallest pipe Linux makes: a few dozen events fill it.
SMALL_PIPE = 4096


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class TailProcess:
    def __init__(self, proc: asyncio.subprocess.Process, unread: int | None) -> None:
        self.proc = proc
        self.lines: list[str] = []  # stdout, when it is read
        self.errors: list[str] = []  # stderr
        self.unread = unread  # the read end of stdout's pipe, when nobody reads it
        self._readers = [asyncio.create_task(self._collect(proc.stderr, self.errors))]
        if proc.stdout is not None:
            self._readers.append(asyncio.create_task(self._collect(proc.stdout, self.lines)))

    @staticmethod
    async def _collect(stream: asyncio.StreamReader | None, into: list[str]) -> None:
        assert stream is not None
        async for line in stream:
            into.append(line.decode())

    @property
    def stderr(self) -> str:
        return "".join(self.errors)

    def blocked_on_stdout(self) -> bool:
        """A thread of tail sleeps in write(2) on a pipe, and its stdout pipe holds data:
        tail has more to write than the unread pipe takes."""
        assert self.unread is not None
        queued = struct.unpack("i", fcntl.ioctl(self.unread, termios.FIONREAD, b"\0" * 4))[0]
        tasks = Path(f"/proc/{self.proc.pid}/task")
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            waits = [(task / "wchan").read_text() for task in tasks.iterdir()]
            return queued > 0 and any("pipe_write" in wait for wait in waits)
        return False

    async def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
        def done() -> bool:
            if self.proc.returncode is not None:
                raise AssertionError(f"pulse tail exited ({self.proc.returncode}): {self.stderr}")
            return condition()

        await eventually(done, what, timeout)

    async def exit_status(self, within: float) -> int:
        """Its exit status, which must come within ``within`` seconds."""
        try:
            await asyncio.wait_for(self.proc.wait(), within)
        except TimeoutError:
            raise AssertionError(f"pulse tail still runs after {within} s: {self.stderr}") from None
        await asyncio.gather(*self._readers)
        assert self.proc.returncode is not None
        return self.proc.returncode

    async def stop(self, signum: int = signal.SIGINT, within: float = 5) -> int:
        """Send ``signum``; the exit status, which must come within ``within`` seconds."""
        self.proc.send_signal(signum)
        return await self.exit_status(within)


@contextlib.asynccontextmanager
async def pulse_tail(
    *args: str, read_stdout: bool = True, env: dict[str, str] | None = None
) -> AsyncIterator[TailProcess]:
    """Run `pulse tail ARGS`; killed on the way out if it still runs.

    ``read_stdout=False``: stdout is a small pipe that nobody reads, as when the
    terminal or the next program in a pipeline stops reading."""
    unread = write_end = None
    if not read_stdout:
        unread, write_end = os.pipe()
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, SMALL_PIPE)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pulse", "tail", *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE if read_stdout else write_end,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    if write_end is not None:
        os.close(write_end)
    tail = TailProcess(proc, unread)
    try:
        yield tail
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for reader in tail._readers:
            reader.cancel()
        if unread is not None:
            os.close(unread)
