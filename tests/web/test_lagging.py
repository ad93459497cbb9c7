"""A client cut as lagging that stops reading holds nothing of the server's for long."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg
import pytest

from pulse.config import Settings
from tests.streams.ws_support import connection_count, until_no_connections
from tests.support import direct_writes, insert_readings, provision_device, running_server

pytestmark = pytest.mark.timeout(90)

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"


def metric(text: str, name: str, kind: str) -> float:
    prefix = f'{name}{{kind="{kind}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix) :]) if lines else 0.0


@pytest.mark.parametrize("kind", ["sse", "websocket", "legacy_v2"])
async def test_a_client_cut_as_lagging_that_stopped_reading_is_dropped(
    settings: Settings,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """Its stream is ended (cancelled if stuck writing) and its connection slot freed,
    in both write modes; with direct writes its connection is also reset, so that it
    holds none of the server's send buffers."""
    import base64
    import os
    import socket

    import httpx

    from pulse.bus import hub

    monkeypatch.setattr(hub, "LAGGING_GRACE_S", 0.5)
    async with running_server(dataclasses.replace(settings, queue_size=50)) as base:
        await provision_device(pool, "t1", "d1")
        token = make_token("t1")
        path = {"sse": SSE_PATH, "websocket": "/api/v1/customer/telemetry/stream"}.get(
            kind, "/api/v2/ws"
        )
        upgrade = (
            ""
            if kind == "sse"
            else "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        )
        parts = urlsplit(base)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (parts.hostname, parts.port))
        request = f"GET {path}?token={token} HTTP/1.1\r\nHost: x\r\n{upgrade}\r\n"
        await loop.sock_sendall(sock, request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)  # the head only: nothing after it is read
        assert head.startswith((b"HTTP/1.1 200", b"HTTP/1.1 101")), head
        if kind == "legacy_v2":
            subscribe = b'{"action":"subscribe","type":"device","device_id":"d1"}'
            mask = os.urandom(4)
            masked = bytes(b ^ mask[i % 4] for i, b in enumerate(subscribe))
            await loop.sock_sendall(sock, b"\x81%c%b%b" % (0x80 | len(subscribe), mask, masked))
        async with asyncio.timeout(10):  # admitted, before the rows come
            while (await connection_count(base))["total"] != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        big = {f"m{i:03d}": float(i) for i in range(200)}  # ~4.5 kB per event
        async with httpx.AsyncClient(base_url=base) as http:
            for _ in range(200):  # ~45 MB at most; the kernel's send buffer takes a few
                await insert_readings(pool, "t1", [("d1", big)] * 50)
                text = (await http.get("/metrics")).text
                if metric(text, "pulse_lagging_disconnects_total", kind):
                    break
            assert metric(text, "pulse_lagging_disconnects_total", kind) == 1
        # Cut, and left unread: after the grace its slot is free ...
        await until_no_connections(base, pool)
        if direct_writes():
            # ... and its connection reset (TCP_CLOSE) rather than left established.
            state = 1
            async with asyncio.timeout(10):
                while state == 1:  # TCP_ESTABLISHED
                    state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
                    await asyncio.sleep(0.05)
            assert state == 7, f"the connection is not reset (TCP state {state})"
        sock.close()


async def test_one_commit_larger_than_the_queue_reaches_idle_readers_whole(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """With PULSE_QUEUE_SIZE=50, one batch of 60 cut every reader of the tenant as
    lagging, idle ones that read at once included (the protocol audit): the telemetry
    WebSocket and v2 closed 4008 before any event, the SSE stream ended `lagging`.
    A reader that took everything before now gets the commit whole, on every stream."""
    import json

    import httpx

    from tests.streams.ws_support import V2_PATH, WS_PATH, open_ws, recv, request
    from tests.support import sse_events

    async with running_server(dataclasses.replace(settings, queue_size=50)) as base:
        await provision_device(pool, "t1", "d1")
        token = make_token("t1")
        async with (
            open_ws(base, WS_PATH, token=token) as telemetry,
            open_ws(base, V2_PATH, token=token) as v2,
            httpx.AsyncClient(base_url=base, timeout=30) as http,
            http.stream("GET", SSE_PATH, params={"token": token}) as sse,
        ):
            assert (await recv(telemetry))["type"] == "connected"
            subscribe = {"action": "subscribe", "type": "device", "device_id": "d1"}
            assert (await request(v2, subscribe))["type"] == "subscribed"
            lines = sse.aiter_lines()
            async with asyncio.timeout(20):
                while not (await anext(lines)).startswith("id:"):
                    pass  # `retry:`, then the `id:` block: live from here
            events = sse_events(sse, lines=lines)
            ids = await insert_readings(pool, "t1", [("d1", {"temp": float(i)}) for i in range(60)])

            async def ws_ids(ws: object) -> list[int]:
                got: list[int] = []
                while len(got) < len(ids):
                    message = await recv(ws, timeout=20)  # type: ignore[arg-type]
                    assert message["type"] == "telemetry", message
                    got.append(message["id"])
                return got

            async def sse_ids() -> list[int]:
                got: list[int] = []
                while len(got) < len(ids):
                    event = await asyncio.wait_for(anext(events), 20)
                    assert event.event is None, event
                    got.append(json.loads(event.data)["id"])
                return got

            assert await ws_ids(telemetry) == ids
            assert await ws_ids(v2) == ids
            assert await sse_ids() == ids
            text = (await http.get("/metrics")).text
            for kind in ("sse", "websocket", "legacy_v2"):
                assert metric(text, "pulse_lagging_disconnects_total", kind) == 0
