"""SSE chunks written straight to the connection (pulse.streams.direct): the bytes on the
wire, read with a raw socket, are a well-formed chunked body for HTTP/1.1 and a plain
body for HTTP/1.0, which never gets the extension."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

import asyncpg
import pytest

from pulse.config import Settings
from tests.support import insert_readings, running_server

pytestmark = pytest.mark.timeout(60)

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
