"""How the WebSocket streams tell a busy consumer from a dead server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from websockets.asyncio.server import ServerConnection, serve

import pulse.client.websocket
from pulse.client import Notice, PulseClient, Telemetry
from pulse.config import Settings
from tests.support import insert_readings, provision_device, running_server, until

pytestmark = pytest.mark.timeout(60)

BURST = 2000


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    # The server's pings, summaries and keepalives come every 0.3 s.
    fast = dataclasses.replace(settings, ws_ping_s=0.3, ws_keepalive_s=0.3)
    async with running_server(fast) as base:
        yield base


def quick_library_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    """The websockets library's own keepalive (a ping every 20 s, closing 1011 when its
    pong is 20 s late), made 40 times quicker: a client that leaves it on cuts a busy
    connection within a second instead of 40 s."""
    real = pulse.client.websocket.connect

    def connect(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("ping_interval", 0.5)
        kwargs.setdefault("ping_timeout", 0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(pulse.client.websocket, "connect", connect)


@pytest.mark.parametrize("kind", ["v2", "websocket"])
async def test_a_consumer_busy_behind_a_burst_keeps_its_connection(
    url: str,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """A consumer that takes its time over a burst stops reading; the library's keepalive
    pong then waits behind the unread frames, and the client closed its own connection
    (1011 "keepalive ping timeout", reported as "closed None"): the telemetry WebSocket
    reconnected and resumed, v2 lost the events between (370 and 751 in the audit). The
    streams now send no keepalive pings of their own; nor is a consumer busy for longer
    than the read timeout taken for a silent server, as long as the server's keepalives
    come."""
    quick_library_keepalive(monkeypatch)
    await provision_device(pool, "t1", "d1")
    notices: list[Notice] = []
    async with PulseClient(url, make_token(), on_notice=notices.append) as client:
        stream = client.v2(device_ids=["d1"]) if kind == "v2" else client.websocket()
        stream.read_timeout_s = 1.5
        received: list[int] = []

        async def consume() -> None:
            async for event in stream:
                if isinstance(event, Telemetry):
                    received.append(event.id)
                    if len(received) == 1:
                        # The consumer's work on its first event: 3 s without reading,
                        # past the quick keepalive's second and the read timeout both.
                        await asyncio.sleep(3)
                    if len(received) == BURST:
                        return

        consumer = asyncio.create_task(consume())
        await until(lambda: any(n.kind == "connected" for n in notices))
        ids = await insert_readings(pool, "t1", [("d1", {"temp": float(i)}) for i in range(BURST)])
        await asyncio.wait_for(consumer, 30)
    assert received == ids
    assert [n.kind for n in notices] == ["connected"], notices
    assert stream.connections == 1


async def test_a_server_silent_for_the_read_timeout_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the library's keepalive off, a server gone without a FIN or a RST (its
    machine, or the network between) would be waited for for ever: a stream waiting
    for a message that gets nothing at all, not even a ping frame, for read_timeout_s
    cuts the connection and connects again, saying why. (At HEAD it stays, answered
    by the library's keepalive, as this server's WebSocket layer answers pings.)"""
    quick_library_keepalive(monkeypatch)
    opened: list[ServerConnection] = []

    async def silent(ws: ServerConnection) -> None:
        opened.append(ws)
        await ws.wait_closed()  # sending nothing

    notices: list[Notice] = []
    async with serve(silent, "127.0.0.1", 0, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with PulseClient(
            f"http://127.0.0.1:{port}", "token", on_notice=notices.append, backoff_cap_s=0.5
        ) as client:
            stream = client.websocket()
            stream.read_timeout_s = 1.0
            consumer = asyncio.create_task(anext(aiter(stream)))
            await until(lambda: len(opened) >= 2)
            consumer.cancel()
    [notice, *_] = notices
    assert (notice.kind, notice.detail) == ("disconnected", "no data from the server in 1 s")


async def test_a_connection_lost_or_closed_by_the_client_says_so() -> None:
    """A connection that ended without a close frame (the server killed with -9, the
    network cut), or one this client closed (its own keepalive's 1011 then), was reported
    as "closed None": `pulse tail` printed "# disconnected: closed None; retrying...".
    Now "connection lost (no close frame)", or the close the client sent."""
    behaviours: list[str] = ["drop", "too big"]

    async def server_side(ws: ServerConnection) -> None:
        if behaviours.pop(0) == "drop":
            ws.transport.abort()  # as a killed process's kernel does: no close frame
        else:
            await ws.send("x" * (2**22 + 1))  # over the client's max_size
        await ws.wait_closed()

    notices: list[Notice] = []
    async with serve(server_side, "127.0.0.1", 0, max_size=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with PulseClient(
            f"http://127.0.0.1:{port}", "token", on_notice=notices.append, backoff_cap_s=0.5
        ) as client:
            stream = client.websocket()
            consumer = asyncio.create_task(anext(aiter(stream)))
            await until(lambda: len(notices) >= 2)
            consumer.cancel()
    lost, closed = (n.detail for n in notices[:2])
    assert lost == "connection lost (no close frame)"
    assert closed.startswith("this client closed the connection (1009 "), closed
