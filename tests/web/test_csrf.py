"""Cross-site request forgery with the session cookie, over a real socket.

A browser attaches the pulse_session cookie to requests from any site,
including form posts (form-encoded) and fetches with a simple content type
(text/plain) that need no CORS preflight. A change authenticated that way must
come from this server's own pages or an origin in PULSE_ALLOWED_ORIGINS; reads,
and requests with an Authorization header, are not affected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.support import provision_device, running_server

MakeToken = Callable[..., str]
DEVICES = "/api/v1/customer/devices"
ALLOWED = "https://app.example"


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    async with running_server(dataclasses.replace(settings, allowed_origins=(ALLOWED,))) as url:
        yield url


async def device_hash(pool: asyncpg.Pool) -> bytes:
    value = await pool.fetchval("SELECT token_hash FROM devices WHERE device_id = 'dev-1'")
    assert isinstance(value, bytes)
    return value


async def open_alert(pool: asyncpg.Pool) -> int:
    alert_id = await pool.fetchval(
        """INSERT INTO alerts (tenant_id, device_id, alert_type, severity, summary, details)
           VALUES ('t1', 'dev-1', 'NO_HEARTBEAT', 3, 'quiet', '{}') RETURNING alert_id"""
    )
    return int(alert_id)


async def test_a_cross_site_change_with_the_cookie_is_refused(
    url: str, pool: asyncpg.Pool, make_token: MakeToken
) -> None:
    await provision_device(pool, "t1", "dev-1")
    alert_id = await open_alert(pool)
    before = await device_hash(pool)
    cookie = {"pulse_session": make_token("t1", roles=("tenant-admin",))}
    async with httpx.AsyncClient(base_url=url, cookies=cookie, timeout=10) as http:
        forged = [
            # The reported probe: a form post that rotates a device's token.
            (
                "POST",
                f"{DEVICES}/dev-1/rotate-token",
                {"Content-Type": "application/x-www-form-urlencoded"},
                b"a=b",
            ),
            (
                "POST",
                f"/api/v1/customer/alerts/{alert_id}/acknowledge",
                {"Content-Type": "text/plain"},
                b"{}",
            ),
            ("POST", f"/api/v1/customer/alerts/{alert_id}/close", {}, b""),
            ("DELETE", f"{DEVICES}/dev-1", {}, b""),
            ("POST", DEVICES, {"Content-Type": "text/plain"}, b'{"device_id": "dev-2"}'),
            ("POST", "/api/v1/stream-ticket", {}, b""),
        ]
        for origin in ("https://evil.example", "null", None, "http://127.0.0.1:1"):
            for method, path, headers, body in forged:
                if origin is not None:
                    headers = {**headers, "Origin": origin}
                response = await http.request(method, path, headers=headers, content=body)
                assert response.status_code == 403, (origin, method, path, response.text)
                assert response.json()["error"] == "origin_not_allowed"
        # Nothing changed.
        assert await device_hash(pool) == before
        assert await pool.fetchval("SELECT status FROM alerts") == "OPEN"
        assert await pool.fetchval("SELECT count(*) FROM devices") == 1
        assert await pool.fetchval("SELECT count(*) FROM stream_tickets") == 0
        # Reads with the cookie are not changes: a page of another site cannot read the
        # answer anyway (no CORS headers).
        response = await http.get(DEVICES, headers={"Origin": "https://evil.example"})
        assert response.status_code == 200


async def test_the_pages_own_origin_and_allowed_origins_may_change(
    url: str, pool: asyncpg.Pool, make_token: MakeToken
) -> None:
    await provision_device(pool, "t1", "dev-1")
    alert_id = await open_alert(pool)
    cookie = {"pulse_session": make_token("t1", roles=("tenant-admin",))}
    async with httpx.AsyncClient(base_url=url, cookies=cookie, timeout=10) as http:
        own = {"Origin": url}  # http://127.0.0.1:<port>, the Host the request goes to
        response = await http.post(f"{DEVICES}/dev-1/rotate-token", headers=own)
        assert response.status_code == 200, response.text
        response = await http.post(
            f"/api/v1/customer/alerts/{alert_id}/acknowledge", headers={"Origin": ALLOWED}
        )
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "ACKNOWLEDGED"


async def test_an_authorization_header_is_not_affected(
    url: str, pool: asyncpg.Pool, make_token: MakeToken
) -> None:
    """A page cannot make a browser send someone's token in a header: no forgery."""
    await provision_device(pool, "t1", "dev-1")
    before = await device_hash(pool)
    bearer = {"Authorization": f"Bearer {make_token('t1', roles=('tenant-admin',))}"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for origin in ({"Origin": "https://evil.example"}, {}):
            response = await http.post(
                f"{DEVICES}/dev-1/rotate-token", headers={**bearer, **origin}
            )
            assert response.status_code == 200, response.text
    assert await device_hash(pool) != before
