"""HTTP/1.1 only, on a real server: HTTP/2 in cleartext is not spoken.

From the protocol abuse audit (7 December 2026): hypercorn's HTTP/2 held a stream's
whole output while the client's window stayed closed (three unauthenticated
connections: 586 MB, never given back), so SSE streams over it were never cut as
lagging, and frames that open no stream starved every other client. Pulse ends no
TLS, so no browser speaks HTTP/2 to it (pulse.serving.http2).
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import h2.config
import h2.connection
import httpx
import orjson
import pytest

from pulse.config import Settings
from tests.support import running_server


async def exchange(url: str, data: bytes) -> bytes:
    """Send ``data`` on a connection of its own; everything the server sends back
    until it closes the connection."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                received += chunk
        return received
    finally:
        writer.close()


def answer(received: bytes) -> tuple[bytes, dict[str, object]]:
    head, _, body = received.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], orjson.loads(body)


async def test_the_http2_preface_is_answered_505_in_http1(settings: Settings) -> None:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(
        1, [(":method", "GET"), (":scheme", "http"), (":authority", "p"), (":path", "/healthz")],
        end_stream=True,
    )  # fmt: skip
    async with running_server(settings) as url:
        status, body = answer(await exchange(url, client.data_to_send()))
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/healthz")).status_code == 200  # still serving
    assert status == b"HTTP/1.1 505 "
    assert body["error"] == "http_error" and "HTTP/1.1 only" in str(body["detail"])


@pytest.mark.parametrize("settings_header", [b"AAMAAABkAARAAAAAAAIAAAAA", b"A"])
async def test_an_h2c_upgrade_is_answered_in_http1_and_logs_no_credential(
    settings: Settings, caplog: pytest.LogCaptureFixture, settings_header: bytes
) -> None:
    """Usable HTTP2-Settings or not (the security audit: an unusable one raised in
    hypercorn's upgrade, and asyncio logged the whole request, credentials included),
    the request is answered in HTTP/1.1, not switched."""
    caplog.set_level(logging.DEBUG)
    async with running_server(settings) as url:
        received = await exchange(
            url,
            b"GET /healthz?ticket=pst_leak-me-1 HTTP/1.1\r\nHost: pulse\r\n"
            b"Authorization: Bearer leak-me-2\r\nCookie: pulse_session=leak-me-3\r\n"
            b"Connection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: " + settings_header + b"\r\n\r\n",
        )
    assert received.startswith(b"HTTP/1.1 200 "), received[:200]
    assert b"upgrade" not in received.lower()
    logged = caplog.text + "".join(str(r.exc_info) for r in caplog.records)
    assert "leak-me" not in logged, logged[-2000:]


async def test_an_unknown_transfer_encoding_is_501_http_error(settings: Settings) -> None:
    """From the same audit: the 501 for a Transfer-Encoding other than chunked said
    ``bad_request``, which the error catalogue ties to 400."""
    async with running_server(settings) as url:
        status, body = answer(
            await exchange(
                url,
                b"POST /api/v1/customer/devices HTTP/1.1\r\nHost: pulse\r\n"
                b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            )
        )
    assert status == b"HTTP/1.1 501 "
    assert body["error"] == "http_error"
