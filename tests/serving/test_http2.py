"""HTTP/2 (cleartext, prior knowledge) on a real server: an answer given before the
request's body was read leaves the connection and its other streams alive."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from pulse.app import MAX_BODY_BYTES
from pulse.config import Settings
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
