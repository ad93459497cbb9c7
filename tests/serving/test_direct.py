"""Streams written straight to the connection (pulse.serving.direct): the bytes on the
wire, read with a raw socket, are a well-formed chunked body for HTTP/1.1 and a plain
body for HTTP/1.0, which never gets the extension; live events reach clients that keep
up from the hub's own call; a client cut as lagging that stops reading is reset."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import asyncpg
import pytest

from pulse.config import Settings
from tests.support import direct_writes, insert_readings, provision_device, running_server

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        not direct_writes(), reason="tests of direct writes, which PULSE_DIRECT_WRITES=0 turns off"
    ),
]

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    async with running_server(dataclasses.replace(settings, sse_keepalive_s=60)) as base:
        yield base


async def open_sse(
    url: str, token: str, version: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"GET {SSE_PATH} HTTP/{version}\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Last-Event-ID: 0\r\n\r\n".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, head  # the writer is kept: collecting it closes the socket


async def read_chunked(reader: asyncio.StreamReader, until: bytes) -> bytes:
    """Decode chunks strictly (size line, exactly that many bytes, CRLF) until ``until``."""
    body = b""
    while until not in body:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        assert size > 0, "the body ended early"
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"
    return body


async def read_plain(reader: asyncio.StreamReader, until: bytes) -> bytes:
    body = b""
    while until not in body:
        body += await reader.read(65536)
    return body


def expected(ids: list[int]) -> list[bytes]:
    return [b"id: %d\ndata: " % i for i in ids]


@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_sse_bytes_on_the_wire(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str], version: str
) -> None:
    replayed = await insert_readings(pool, "t1", [(f"d{i}", {"v": i}) for i in range(300)])
    reader, writer, head = await open_sse(url, make_token("t1"), version)
    assert head.startswith(b"HTTP/1.1 200")
    assert (b"transfer-encoding: chunked" in head.lower()) == (version == "1.1")
    read = read_chunked if version == "1.1" else read_plain
    body = await read(reader, b"id: %d\n" % replayed[-1])
    live = await insert_readings(pool, "t1", [("d1", {"v": 1}), ("d2", {"v": 2})])
    body += await read(reader, b"id: %d\n" % live[-1])
    body += await read(reader, b"\n\n") if not body.endswith(b"\n\n") else b""
    assert body.startswith(b"retry: 2000\n\n")
    frames = body.split(b"\n\n")[1:-1]
    assert [f[: len(e)] for f, e in zip(frames, expected(replayed + live), strict=True)] == (
        expected(replayed + live)
    )
    writer.close()


# -- live events written by the hub (Subscription.deliver_now) ------------------


def metric(text: str, name: str, kind: str) -> float:
    prefix = f'{name}{{kind="{kind}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return float(lines[0][len(prefix) :]) if lines else 0.0


async def test_live_events_to_clients_that_keep_up_are_written_by_the_hub(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """SSE, the telemetry WebSocket and v2 each get every live event, in order, and every
    one of them went out from the hub's call, not through a woken stream task."""
    import httpx

    from tests.streams.ws_support import V2_PATH, open_ws, recv, request

    token = make_token("t1")
    await provision_device(pool, "t1", "d1")
    first = await insert_readings(pool, "t1", [("d1", {"v": 0})])
    reader, writer, _ = await open_sse(url, token, "1.1")
    await read_chunked(reader, b"id: %d\n" % first[-1])
    async with (
        open_ws(url, token=token) as ws,
        open_ws(url, V2_PATH, token=token) as v2,
        httpx.AsyncClient(base_url=url) as http,
    ):
        assert (await recv(ws))["type"] == "connected"
        reply = await request(v2, {"action": "subscribe", "type": "device", "device_id": "d1"})
        assert reply["type"] == "subscribed"
        # Every stream has gone live and waits once each client has a first live event.
        (live,) = await insert_readings(pool, "t1", [("d1", {"v": 0})])
        await read_chunked(reader, b"id: %d\n" % live)
        assert (await recv(ws))["id"] == live
        while (message := await recv(v2)).get("type") != "telemetry":
            pass
        assert message["id"] == live
        before = (await http.get("/metrics")).text
        ids = []
        for i in range(1, 21):
            ids += await insert_readings(pool, "t1", [("d1", {"v": i})])
            await asyncio.sleep(0.01)
        sse_body = await read_chunked(reader, b"id: %d\n" % ids[-1])
        ws_ids = [(await recv(ws))["id"] for _ in ids]
        v2_ids = []
        while len(v2_ids) < len(ids):
            message = await recv(v2)
            if message.get("type") == "telemetry":
                v2_ids.append(message["id"])
        after = (await http.get("/metrics")).text
    writer.close()
    assert [int(line[4:]) for line in sse_body.split(b"\n") if line.startswith(b"id: ")] == ids
    assert ws_ids == ids and v2_ids == ids
    for kind in ("sse", "websocket", "legacy_v2"):
        delivered = metric(after, "pulse_events_delivered_total", kind) - metric(
            before, "pulse_events_delivered_total", kind
        )
        directly = metric(after, "pulse_events_delivered_directly_total", kind) - metric(
            before, "pulse_events_delivered_directly_total", kind
        )
        assert delivered == len(ids) and directly == len(ids), (kind, delivered, directly)


async def test_abort_unread_resets_a_client_whose_bytes_wait_in_the_kernel() -> None:
    """The process's buffer is empty, the kernel's send queue is not: still a reset."""
    import socket
    import types

    from pulse.serving.direct import _Socket

    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def on_connect(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.set_result(w)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    try:
        writer = await asyncio.wait_for(accepted, 10)
        conn = _Socket(types.SimpleNamespace(send_lock=asyncio.Lock(), writer=writer))
        # More than the client's receive buffer takes, less than the kernel's send
        # buffer holds: it all leaves the process and waits in the kernel, unread.
        unread = client.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) + 64 * 1024
        conn.transport.write(b"x" * unread)
        async with asyncio.timeout(10):
            while conn.transport.get_write_buffer_size():  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        conn.abort_unread()
        client.settimeout(10)

        def read_all() -> None:
            while client.recv(1 << 20):
                pass

        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(read_all)  # the loop closes the socket meanwhile
        conn.abort_unread()  # closed already: nothing to do, and no error
    finally:
        client.close()
        server.close()
