"""HTTP/2 (cleartext, prior knowledge) on a real server: an answer given before the
request's body was read leaves the connection and its other streams alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg
import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest

from pulse.config import Settings
from pulse.ingest.buffer import MAX_BODY_BYTES
from tests.support import provision_device, running_server


async def test_an_early_answer_over_http2_keeps_the_connection(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """A body over the limit is refused (413) before it is read; the client is still
    sending it when hypercorn closes the stream. The DATA frames that follow used to
    raise KeyError in hypercorn, which killed the connection with every stream on it:
    the client saw a broken pipe, not the 413."""
    token = await provision_device(pool, "t1", "d1")
    reading = "/ingest/v1/tenant/t1/device/d1/telemetry"
    async with (
        running_server(settings) as url,
        httpx.AsyncClient(base_url=url, http1=False, http2=True, timeout=20) as http,
    ):
        big = b" " * (MAX_BODY_BYTES + 10)
        refused, other = await asyncio.gather(
            http.post(reading, content=big, headers={"X-Provision-Token": token}),
            http.get(
                "/api/v1/customer/devices",
                headers={"Authorization": f"Bearer {make_token('t1')}"},
            ),
        )
        assert refused.http_version == "HTTP/2"
        assert refused.status_code == 413, refused.text
        assert refused.json()["error"] == "payload_too_large"
        assert other.status_code == 200
        # Another refusal before the body, for a missing credential, then the same
        # connection still serves.
        r = await http.post("/api/v1/customer/devices", content=b"x" * 300_000)
        assert r.status_code == 401
        ok = await http.post(
            reading, json={"metrics": {"t": 1}}, headers={"X-Provision-Token": token}
        )
        assert ok.status_code == 201, ok.text


async def test_a_malformed_h2c_upgrade_is_closed_and_logs_no_credential(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """From the security audit: an `Upgrade: h2c` with an HTTP2-Settings that is no
    base64 raised in hypercorn's upgrade, and asyncio's handler logged the exception
    with the whole request attached, Authorization, cookies and ?ticket= included, at
    ERROR (every PULSE_LOG_LEVEL), a 45-line traceback per connection."""
    caplog.set_level(logging.DEBUG)
    async with running_server(settings) as url:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(
            b"GET /api/v1/customer/devices?ticket=pst_leak-me-1 HTTP/1.1\r\n"
            b"Host: pulse\r\nAuthorization: Bearer leak-me-2\r\nCookie: pulse_session=leak-me-3\r\n"
            b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: A\r\n\r\n"
        )
        await writer.drain()
        async with asyncio.timeout(10):
            while await reader.read(65536):  # until the server closes it
                pass
        writer.close()
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/healthz")).status_code == 200  # still serving
    logged = caplog.text + "".join(str(r.exc_info) for r in caplog.records)
    assert "leak-me" not in logged, logged[-2000:]


async def test_streams_reset_as_fast_as_they_open_close_the_connection(
    settings: Settings,
) -> None:
    """From the abuse audit (MEDIUM-HIGH): over h2c, a client opening streams and
    resetting them at once (10-20 k a second, no credential needed) made the server start
    and cancel a request for each; another tenant's ingest took up to 2.6 s, or timed
    out with a token. Past a burst of resets the connection is closed with GOAWAY
    ENHANCE_YOUR_CALM, and the server goes on serving others."""
    async with running_server(settings) as url:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        client.initiate_connection()
        writer.write(client.data_to_send())
        headers = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "pulse"),
            (":path", "/healthz"),
        ]
        terminated: h2.events.ConnectionTerminated | None = None
        streams = 0
        async with asyncio.timeout(20):
            while terminated is None and streams < 5000:
                for _ in range(50):
                    stream_id = client.get_next_available_stream_id()
                    client.send_headers(stream_id, headers, end_stream=True)
                    client.reset_stream(stream_id)
                    streams += 1
                writer.write(client.data_to_send())
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        data = await reader.read(65536)
                        if not data:
                            break
                        for event in client.receive_data(data):
                            if isinstance(event, h2.events.ConnectionTerminated):
                                terminated = event
        writer.close()
        assert terminated is not None, f"{streams} streams reset, the connection still open"
        assert terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
        assert streams <= 2000, streams
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/healthz")).status_code == 200
