"""Helpers for the WebSocket tests: real `websockets` clients against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

WS_PATH = "/api/v1/customer/telemetry/stream"
V2_PATH = "/api/v2/ws"
STATUS_PATH = "/api/v1/telemetry/stream/status"


def ws_url(base: str, path: str, **params: str | int | None) -> str:
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return base.replace("http://", "ws://", 1) + path + ("?" + query if query else "")


@contextlib.asynccontextmanager
async def open_ws(
    base: str, path: str = WS_PATH, *, headers: dict[str, str] | None = None, **params: Any
) -> AsyncIterator[ClientConnection]:
    async with connect(
        ws_url(base, path, **params), additional_headers=headers, max_size=None, open_timeout=10
    ) as ws:
        yield ws


async def recv(ws: ClientConnection, timeout: float = 5) -> Any:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def recv_raw(ws: ClientConnection, timeout: float = 5) -> str:
    data = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(data, str), "the server sends text frames"
    return data


async def request(ws: ClientConnection, message: Any, timeout: float = 5) -> Any:
    """Send a message and return the next message that is not telemetry or a ping."""
    await ws.send(message if isinstance(message, str | bytes) else json.dumps(message))
    while True:
        reply = await recv(ws, timeout)
        if reply.get("type") not in ("telemetry", "ping"):
            return reply


async def closed(ws: ClientConnection, timeout: float = 10) -> tuple[int | None, str | None]:
    """Read until the server closes; the close code and reason it sent."""

    async def drain() -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()

    await asyncio.wait_for(drain(), timeout)
    assert ws.close_code is not None
    return ws.close_code, ws.close_reason


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One frame of the server's (unmasked): its opcode and payload."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length >= 126:
        length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8))
    return first & 0x0F, await reader.readexactly(length)


def masked_text(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client's frame, text unless ``opcode`` says otherwise (masked with zeros: the
    payload as it is)."""
    n = len(payload)
    size = (
        bytes([0x80 | n])
        if n < 126
        else b"\xfe" + n.to_bytes(2)
        if n < 65536
        else (b"\xff" + n.to_bytes(8))
    )
    return bytes([0x80 | opcode]) + size + bytes(4) + payload


@contextlib.asynccontextmanager
async def raw_ws(
    base: str, path: str, token: str
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A WebSocket handshake over a plain socket, for a test that reads (or sends) frames
    that client libraries hide (pings) or will not send; the socket after the 101."""
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"GET %s?token=%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n\r\n" % (path.encode(), token.encode())
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101"), head
        yield reader, writer
    finally:
        writer.close()


async def close_of(base: str, path: str = WS_PATH, **kw: Any) -> tuple[int | None, str | None]:
    """Open a WebSocket that the server is expected to close; its close code and reason."""
    headers = kw.pop("headers", None)
    async with open_ws(base, path, headers=headers, **kw) as ws:
        return await closed(ws)


async def until_no_connections(base: str, pool: asyncpg.Pool | None = None) -> None:
    """Wait until the server counts no stream connection (and the table holds none)."""
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        for _ in range(200):
            body = (await http.get(STATUS_PATH)).json()
            rows = (
                0
                if pool is None
                else await pool.fetchval("SELECT count(*) FROM stream_connections")
            )
            if body["connections"]["total"] == 0 and rows == 0:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"connections left open: {body['connections']}, {rows} rows")


async def connection_count(base: str) -> dict[str, int]:
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        return dict((await http.get(STATUS_PATH)).json()["connections"])
