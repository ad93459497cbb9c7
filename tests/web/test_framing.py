"""A request with both Content-Length and Transfer-Encoding: refused, and its connection
closed (RFC 9112, section 6.1), so that nothing after it can pass for another request."""

from __future__ import annotations

import asyncio

import orjson
import pytest

pytestmark = pytest.mark.timeout(30)


async def exchange(server: str, data: bytes) -> bytes:
    """Send ``data`` on a new connection; everything the server sends until it closes."""
    host, port = server.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10)  # until the server closes
    finally:
        writer.close()


SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: pulse\r\n\r\n"


@pytest.mark.parametrize(
    "path", [b"/ingest/v1/batch", b"/ingest/v1/tenant/t1/device/d1/telemetry", b"/healthz"]
)
async def test_both_lengths_are_refused_and_the_connection_closed(server: str, path: bytes) -> None:
    request = (
        b"POST " + path + b" HTTP/1.1\r\nHost: pulse\r\nContent-Type: application/json\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    )
    answer = await exchange(server, request + SMUGGLED)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert b"\r\nconnection: close" in head.lower()
    # Under /api/ or not, as every answer under /api/ (the review of 292fa4b).
    assert b"\r\ncache-control: no-store" in head.lower()
    assert b"\r\nx-content-type-options: nosniff" in head.lower()
    assert orjson.loads(body)["error"] == "bad_request"
    assert answer.count(b"HTTP/1.1") == 1, "the request after it was not served"


async def test_one_length_keeps_the_connection(server: str) -> None:
    """Keep-alive as before: two requests on one connection, the second closing it."""
    first = b"GET /healthz HTTP/1.1\r\nHost: pulse\r\n\r\n"
    second = b"GET /healthz HTTP/1.1\r\nHost: pulse\r\nConnection: close\r\n\r\n"
    answer = await exchange(server, first + second)
    assert answer.count(b"HTTP/1.1 200") == 2, answer


@pytest.mark.parametrize(
    ("head", "status", "error"),
    [
        (b"Content-Length: abc\r\n", 400, "bad_request"),
        (b"Content-Length: -1\r\n", 400, "bad_request"),
        (b"Content-Length: 2\r\nContent-Length: 3\r\n", 400, "bad_request"),
        (b"Authorization: Bearer " + b"x" * 100_000 + b"\r\n", 431, "headers_too_large"),
    ],
)
async def test_what_hypercorn_refuses_gets_the_error_body(
    server: str, head: bytes, status: int, error: str
) -> None:
    """h11 refuses these before the app sees them; the answer had an empty body."""
    request = b"POST /ingest/v1/batch HTTP/1.1\r\nHost: pulse\r\n" + head + b"\r\n{}"
    answer = await exchange(server, request)
    head_, _, body = answer.partition(b"\r\n\r\n")
    assert head_.startswith(b"HTTP/1.1 %d" % status), answer[:300]
    assert b"\r\nconnection: close" in head_.lower()
    assert b"\r\ncontent-type: application/json" in head_.lower()
    parsed = orjson.loads(body)
    assert set(parsed) == {"error", "detail"} and parsed["error"] == error, parsed
