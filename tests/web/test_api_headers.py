"""Answers under /api/ are kept by no cache and never sniffed (security audit, L4).

They carry a tenant's devices, alerts, rules, readings and exports, and the refusals:
``Cache-Control: no-store`` and ``X-Content-Type-Options: nosniff`` on each, whichever
door answers (Quart's routes and error handlers, the SSE and ticket fast paths). An SSE
stream keeps its ``no-cache``.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import httpx
import pytest

from tests.streams.sse_client import SSE_PATH
from tests.support import insert_readings
from tests.web.test_sse import read_body

pytestmark = pytest.mark.timeout(60)

DEVICES = "/api/v1/customer/devices"


def assert_not_stored(r: httpx.Response) -> None:
    where = f"{r.request.method} {r.request.url.path} {r.status_code}"
    assert r.headers.get("cache-control") == "no-store", where
    assert r.headers.get("x-content-type-options") == "nosniff", where


async def test_every_api_answer_is_not_stored(
    http: httpx.AsyncClient,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    quart_requests: list[str],
) -> None:
    admin = {"Authorization": f"Bearer {make_token('t1', roles=('tenant-admin',))}"}
    r = await http.post(DEVICES, json={"device_id": "d1", "name": "one"}, headers=admin)
    assert r.status_code == 201, r.text
    assert_not_stored(r)
    r = await http.post(
        "/api/v1/customer/alert-rules",
        json={"name": "hot", "metric": "temp", "operator": ">", "threshold": 50, "severity": 2},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    assert_not_stored(r)
    await insert_readings(pool, "t1", [("d1", {"temp": 60})])

    answered = []
    for method, path, kwargs in [
        ("GET", DEVICES, {}),
        ("GET", DEVICES + "/d1", {}),
        ("GET", DEVICES + "/d1/telemetry", {}),
        ("GET", DEVICES + "/d1/telemetry", {"headers": {**admin, "Accept": "text/csv"}}),
        ("GET", "/api/v1/customer/telemetry/history", {"params": {"metric": "temp"}}),
        ("GET", "/api/v1/customer/fleet/summary", {}),
        ("GET", "/api/v1/customer/alerts", {}),
        ("GET", "/api/v1/customer/alert-rules", {}),
        ("GET", "/api/v1/telemetry/stream/status", {}),
        ("POST", "/api/v1/stream-ticket", {}),  # the ticket fast path
        ("GET", DEVICES + "/nope", {}),  # 404, from an error handler
        ("GET", "/api/v1/customer/nothing-here", {}),  # 404, from routing
        ("GET", DEVICES, {"headers": {"Authorization": "Bearer nonsense"}}),  # 401
        ("POST", "/api/v1/stream-ticket", {"headers": {"Authorization": "Bearer x"}}),  # Quart
        ("GET", SSE_PATH, {"params": {"ticket": "pst_" + "A" * 43}, "headers": {}}),  # fast path
        ("GET", SSE_PATH, {"params": {"device_id": "bad name!"}}),  # Quart's 400
    ]:
        kwargs.setdefault("headers", admin)
        r = await http.request(method, path, **kwargs)  # type: ignore[arg-type]
        assert_not_stored(r)
        answered.append(r.status_code)
    assert answered == [200] * 9 + [200, 404, 404, 401, 401, 401, 400], answered
    assert quart_requests.count("/api/v1/stream-ticket") == 1  # the other, by its fast path
    assert quart_requests.count(SSE_PATH) == 1


async def test_a_stream_keeps_no_cache_and_is_not_sniffed(
    http: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    async with http.stream(
        "GET", SSE_PATH, headers={"Authorization": f"Bearer {make_token('t1')}"}
    ) as r:
        assert r.status_code == 200
        await read_body(r, b"retry")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-content-type-options"] == "nosniff"


async def test_pages_outside_the_api_keep_their_own_caching(http: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/openapi.json", "/"):
        r = await http.get(path)
        assert r.status_code == 200, path
        assert r.headers.get("cache-control") != "no-store", path
