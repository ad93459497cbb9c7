"""Output written by a thread of its own, and signals handled in the loop (no server)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator

import pytest

from pulse.client.terminal import Output, run_until_signal

LINE = b"x" * 999 + b"\n"


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    yield read_end, write_end
    for fd in (read_end, write_end):
        with contextlib.suppress(OSError):  # closed by the test
            os.close(fd)


async def test_a_reader_that_stops_reading_holds_the_writer_but_never_the_loop(
    pipe: tuple[int, int],
) -> None:
    read_end, write_end = pipe
    output = Output(write_end, max_pending=8)
    lines = [b"%04d" % i + LINE for i in range(100)]  # 100 kB into a 4 kB pipe

    async def write_all() -> None:
        for line in lines:
            await output.write(line)
        await output.drain()

    writing = asyncio.create_task(write_all())
    # The writer waits for room; the loop keeps running timers on time meanwhile.
    for _ in range(20):
        started = time.monotonic()
        await asyncio.sleep(0.01)
        assert time.monotonic() - started < 2  # a blocked loop would not come back at all
    assert not writing.done()
    received = await asyncio.to_thread(read_exactly, read_end, sum(map(len, lines)))
    await asyncio.wait_for(writing, 10)
    assert received == b"".join(lines)  # everything, in order


def read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        data += os.read(fd, size - len(data))
    return data


async def test_a_reader_gone_ends_writing_with_broken_pipe(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe
    os.close(read_end)
    output = Output(write_end)
    with pytest.raises(BrokenPipeError):
        for _ in range(10):  # the first writes may queue before the failure is known
            await output.write(LINE)
            await output.drain()
    assert isinstance(output.error, BrokenPipeError)
    assert not output.write_nowait(LINE)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_a_signal_cancels_the_work_and_returns_none(signum: int) -> None:
    started = asyncio.Event()
    finished: list[str] = []

    async def work() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            finished.append("cleaned up")
        return "never"

    running = asyncio.create_task(run_until_signal(work()))
    await started.wait()
    # Not the default action, which would end the test run rather than this test.
    assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.default_int_handler)
    os.kill(os.getpid(), signum)
    assert await asyncio.wait_for(running, 5) is None
    assert finished == ["cleaned up"]
    assert await run_until_signal(asyncio.sleep(0, "done")) == "done"
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)
