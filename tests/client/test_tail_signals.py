"""Ctrl-C (SIGINT) and SIGTERM stop `pulse tail` within a few seconds, whatever it is doing:
waiting to reconnect, writing to a stdout nobody reads, replaying history, connecting."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from tests.client.tailproc import pulse_tail
from tests.support import free_port, insert_readings

pytestmark = pytest.mark.timeout(90)

# A few seconds, measured from the signal; the process is up and running by then.
PROMPTLY_S = 5.0


async def history(pool: asyncpg.Pool, events: int) -> None:
    for start in range(0, events, 1000):
        batch = [
            (f"dev-{i % 7}", {"temp": 20.0 + i % 10, "n": i}) for i in range(start, start + 1000)
        ]
        await insert_readings(pool, "t1", batch[: events - start])


def assert_quiet(status: int, stderr: str) -> None:
    """Exit status 0, and nothing on stderr but notices (no traceback)."""
    assert status == 0, stderr
    assert all(line.startswith("# ") for line in stderr.splitlines()), stderr


async def test_sigint_while_waiting_to_reconnect(make_token: Callable[..., str]) -> None:
    """No server: tail sleeps between attempts (up to seconds); the signal cuts the sleep."""
    url = f"http://127.0.0.1:{free_port()}"
    async with pulse_tail(
        "--url", url, "--token", make_token(), "--connect-timeout", "600"
    ) as tail:

        def long_wait() -> bool:
            delays = re.findall(r"retrying in ([0-9.]+) s", tail.stderr)
            return bool(delays) and float(delays[-1]) >= 1.0

        await tail.wait_for(long_wait, "a wait of a second or more before the next attempt")
        assert_quiet(await tail.stop(within=PROMPTLY_S), tail.stderr)


@pytest.mark.parametrize(
    "signum", [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]
)
@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_signal_while_stdout_is_a_pipe_nobody_reads(
    server: str,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    transport: str,
    signum: int,
) -> None:
    """The root cause of the lost Ctrl-C: tail wrote to stdout in the event loop's thread,
    and a write to a full pipe blocks until someone reads; the interrupted write(2)
    was retried, the cancellation of the main task never got to run."""
    await history(pool, 2000)
    args = ("--url", server, "--token", make_token(), "--from-id", "0", "--transport", transport)
    async with pulse_tail(*args, read_stdout=False) as tail:
        await tail.wait_for(tail.blocked_on_stdout, "a write to the full stdout pipe")
        assert_quiet(await tail.stop(signum, within=PROMPTLY_S), tail.stderr)


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_sigint_while_replaying_history(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str], transport: str
) -> None:
    events = 40_000  # more than a stalled test process lets the tail print before SIGINT
    await history(pool, events)
    args = ("--url", server, "--token", make_token(), "--from-id", "0", "--transport", transport)
    async with pulse_tail(*args) as tail:
        await tail.wait_for(lambda: len(tail.lines) >= 50, "the replay to start")
        assert_quiet(await tail.stop(within=PROMPTLY_S), tail.stderr)
    assert 50 <= len(tail.lines) < events  # stopped in the middle, at a line's end
    assert all(line.endswith("}\n") for line in tail.lines)


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """Accepts connections and never answers: every attempt hangs in its handshake."""
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        accepted.set()

    listener = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", accepted
    for writer in held:
        writer.close()
    listener.close()
    await listener.wait_closed()


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_sigint_while_connecting(
    silent_server: tuple[str, asyncio.Event], make_token: Callable[..., str], transport: str
) -> None:
    url, accepted = silent_server
    args = ("--url", url, "--token", make_token(), "--transport", transport)
    async with pulse_tail(*args, "--connect-timeout", "600") as tail:
        await tail.wait_for(accepted.is_set, "tail's connection")
        assert_quiet(await tail.stop(within=PROMPTLY_S), tail.stderr)
    assert "# connected" not in tail.stderr
