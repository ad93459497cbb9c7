"""A connection's idle timeout, kept by a timer instead of hypercorn's task per connection
(pulse.serving.idle), means what it meant: an idle connection is closed after
PULSE_HTTP_IDLE_TIMEOUT_S, a connection in use is not, and stopping the server closes
the idle ones at once."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pulse.serving import idle, tuning
from tests.support import pulse_serve

pytestmark = pytest.mark.timeout(90)

REQUEST = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = urlsplit(url)
    return await asyncio.open_connection(address.hostname, address.port)


async def answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Send a request on the connection and read its whole answer: True if it came."""
    writer.write(REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    [length] = [
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    ]
    await asyncio.wait_for(reader.readexactly(length), 10)
    return head.startswith(b"HTTP/1.1 200")


async def closed_by_server(reader: asyncio.StreamReader, deadline_s: float) -> float:
    """Read until the server closes the connection; the seconds it took."""
    start = time.monotonic()
    async with asyncio.timeout(deadline_s):
        while await reader.read(65536):
            pass
    return time.monotonic() - start


def test_the_tuning_replaces_hypercorns_idle_task() -> None:
    from hypercorn.asyncio import tcp_server

    if tuning.apply():
        assert tcp_server.AsyncioSingleTask is idle.IdleTimer  # type: ignore[attr-defined]


async def test_idle_connections_are_closed_and_busy_ones_are_not(
    database_url: str, tmp_path: Path
) -> None:
    env = {"PULSE_HTTP_IDLE_TIMEOUT_S": "3"}
    async with pulse_serve(data_dir=tmp_path, database_url=database_url, env=env) as server:
        silent = await connect(server.url)  # never sends a request
        used = await connect(server.url)
        # Requests well within the timeout, each restarting it: the connection stays.
        for _ in range(4):
            assert await answered(*used)
            await asyncio.sleep(0.3)  # the client's pace, well under the 3 s timeout
        # Then both are idle: the server closes them (and would not wait for ever).
        assert await closed_by_server(silent[0], 20) >= 0
        assert await closed_by_server(used[0], 20) >= 0
        for _, writer in (silent, used):
            writer.close()


async def test_a_connection_that_sends_nothing_is_closed_after_the_first_request_limit(
    database_url: str, tmp_path: Path
) -> None:
    """Clients that connect and never speak held a file each for the whole idle timeout
    (30 s; an audit's 600 of them took every descriptor). Closed after
    PULSE_HTTP_FIRST_REQUEST_TIMEOUT_S now; one that has begun its request is not."""
    env = {"PULSE_HTTP_IDLE_TIMEOUT_S": "60", "PULSE_HTTP_FIRST_REQUEST_TIMEOUT_S": "2"}
    async with pulse_serve(data_dir=tmp_path, database_url=database_url, env=env) as server:
        begun = await connect(server.url)
        begun[1].write(REQUEST[:20])  # part of a request head
        silent = await connect(server.url)
        # Closed after about 2 s, not after the 60 s of the idle timeout.
        assert await closed_by_server(silent[0], 20) < 20
        # The other connection's 2 s are up too (it came first): it is still served.
        begun[1].write(REQUEST[20:])
        head = await asyncio.wait_for(begun[0].readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        for _, writer in (begun, silent):
            writer.close()


async def test_a_request_read_late_is_not_cut_by_the_first_request_limit(
    database_url: str, tmp_path: Path
) -> None:
    """A process busy with a reconnect storm may read a request seconds after it came:
    the first-request limit closes only connections that sent nothing. The process is
    stopped (SIGSTOP) past the limit while the request waits in its socket."""
    env = {"PULSE_HTTP_IDLE_TIMEOUT_S": "60", "PULSE_HTTP_FIRST_REQUEST_TIMEOUT_S": "1"}
    async with pulse_serve(data_dir=tmp_path, database_url=database_url, env=env) as server:
        reader, writer = await connect(server.url)
        # Accepted (its timer running) once a later connection has been answered.
        later = await connect(server.url)
        assert await answered(*later)
        later[1].close()
        server.proc.send_signal(signal.SIGSTOP)
        try:
            writer.write(REQUEST)
            await writer.drain()
            await asyncio.sleep(2)  # the delay under test: past the 1 s limit
        finally:
            server.proc.send_signal(signal.SIGCONT)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200"), head
        writer.close()


async def test_stopping_closes_idle_connections_at_once(database_url: str, tmp_path: Path) -> None:
    """With the default 30 s idle timeout, a stop does not wait for it, nor for the end
    of its 25 s grace for requests in flight."""
    env = {"PULSE_SHUTDOWN_TIMEOUT_S": "25"}
    async with pulse_serve(data_dir=tmp_path, database_url=database_url, env=env) as server:
        idle_after_a_request = [await connect(server.url) for _ in range(5)]
        for reader, writer in idle_after_a_request:
            assert await answered(reader, writer)
        never_asked = await connect(server.url)
        start = time.monotonic()
        code = await server.stop(timeout=40)
        assert code == 0
        assert time.monotonic() - start < 15  # neither the idle timeout nor the grace
        for reader, writer in [*idle_after_a_request, never_asked]:
            await closed_by_server(reader, 5)
            writer.close()


class _Context:
    def __init__(self) -> None:
        self.terminated = asyncio.Event()


class _Config:
    keep_alive_timeout = 60.0


class _Server:
    """What IdleTimer uses of hypercorn's TCPServer."""

    def __init__(self) -> None:
        self.context = _Context()
        self.config = _Config()
        self.closed = 0

    async def _idle_timeout(self) -> None:  # what the timer stands for; never run
        raise AssertionError("the timer runs no idle task")

    async def _initiate_server_close(self) -> None:
        self.closed += 1


class _Group:
    def __init__(self, group: asyncio.TaskGroup) -> None:
        self._task_group = group


async def test_a_timeout_as_the_connection_ends_is_dropped_quietly() -> None:
    """The timer (or the server's termination) may fire while the connection's task
    group is already ending: the connection is going anyway, so nothing is started and
    nothing is left behind (the CI rehearsal saw a coroutine never awaited)."""
    server = _Server()
    timer = idle.IdleTimer()
    async with asyncio.TaskGroup() as group:
        await timer.restart(_Group(group), server._idle_timeout)
        timer._expire()  # in time: the close runs in the connection's group
    assert server.closed == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        await timer.restart(_Group(group), server._idle_timeout)  # a group now finished
        timer._expire()
        gc.collect()
    assert server.closed == 1
    await timer.stop()


def test_bytes_waiting_to_be_read_are_counted_where_tcp_info_is_silent() -> None:
    """From the review of the first-request limit: a kernel that answers TCP_INFO with
    its bytes received left at 0 (gVisor) made every new connection look silent; the
    receive queue is asked too."""
    a, b = socket.socketpair()
    with a, b:
        assert idle._unread(b) == 0
        a.sendall(b"GET / HTTP/1.1\r\n")
        assert idle._unread(b) == 16


async def test_each_connection_counts_as_made() -> None:
    """The garbage collector's watch learns of a reconnect storm from this count
    (pulse.serving.collector): one per connection hypercorn serves, requests or not."""
    if not tuning.apply():
        pytest.skip("hypercorn's version differs: the tunings do not apply")
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    async def app(scope: dict[str, object], receive: object, send: Any) -> None:
        if scope["type"] == "http":
            headers = [(b"content-length", b"2")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"ok"})

    listening = socket.create_server(("127.0.0.1", 0))
    config = Config()
    config.bind = [f"fd://{listening.fileno()}"]
    config.accesslog = config.errorlog = None
    stop = asyncio.Event()
    serving = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait, mode="asgi"))
    try:
        url = f"http://127.0.0.1:{listening.getsockname()[1]}"
        before = idle.connections_made()
        opened = [await connect(url) for _ in range(5)]
        reader, writer = opened[0]
        assert await answered(reader, writer)  # one with a request, four without
        async with asyncio.timeout(10):  # each is counted as the server takes it
            while idle.connections_made() - before < 5:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert idle.connections_made() - before == 5
        for _, writer in opened:
            writer.close()
    finally:
        stop.set()
        await serving
