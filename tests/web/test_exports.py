"""History exports on a real server: how many stream at once, and for how long.

Each export holds a pooled connection while its client reads. The exports here are
large (about 18 MB of CSV), so a client that stops reading keeps the server's
export open: its bytes no longer fit in the sockets' buffers.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.history.readings import many_readings
from tests.support import provision_device, running_server

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
EXPORT = "/api/v1/customer/devices/d1/telemetry"
CSV = {"Accept": "text/csv"}
# raw: `auto` exports the buckets of a range older than the server's retention, which
# this one is since 8 December 2026 (a few bytes, done before any limit can cut them).
WINDOW = {"from": "2026-12-01T00:00:00Z", "to": "2026-12-03T00:00:00Z", "bucket": "raw"}
READINGS = 100_000  # x 4 metrics: 400,000 lines of CSV


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@pytest.fixture
async def server(
    settings: Settings, pool: asyncpg.Pool, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    for tenant in ("t1", "t2", "t3"):
        await provision_device(pool, tenant, "d1")
    for tenant in ("t1", "t2"):
        await many_readings(pool, tenant, "d1", READINGS, T0)
    limits = dataclasses.replace(
        settings,
        max_exports=2,
        max_exports_per_tenant=1,
        db_pool_size=4,
        rollup_interval_s=3600,
        **getattr(request, "param", {}),
    )
    async with running_server(limits) as url:
        yield url


def client(url: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=20, headers={"Authorization": f"Bearer {token}"})


async def test_exports_at_once_are_bounded_per_tenant_and_process(
    server: str, make_token: Callable[..., str], pool: asyncpg.Pool
) -> None:
    async with AsyncExitStack() as stack:
        t1, t2, t3 = [
            await stack.enter_async_context(client(server, make_token(t)))
            for t in ("t1", "t2", "t3")
        ]
        held = await stack.enter_async_context(t1.stream("GET", EXPORT, params=WINDOW, headers=CSV))
        assert held.status_code == 200  # and then not read: the export stays open
        again = await t1.get(EXPORT, params=WINDOW, headers=CSV)
        assert again.status_code == 429
        assert again.json()["error"] == "export_limit"
        assert "tenant streams 1 export" in again.json()["detail"]
        assert again.headers["Retry-After"] == "5"
        other = await stack.enter_async_context(
            t2.stream("GET", EXPORT, params=WINDOW, headers=CSV)
        )
        assert other.status_code == 200
        full = await t3.get(EXPORT, params=WINDOW, headers=CSV)
        assert full.status_code == 429 and "This server streams" in full.json()["detail"]
        # The pool's other connections still serve ingest and reads.
        token = await provision_device(pool, "t3", "d2")
        posted = await t3.post(
            "/ingest/v1/tenant/t3/device/d2/telemetry",
            json={"metrics": {"v": 1}},
            headers={"X-Provision-Token": token},
        )
        assert posted.status_code == 201, posted.text
        assert (await t3.get(EXPORT, params={**WINDOW, "bucket": "raw"})).status_code == 200
        await held.aclose()  # the client leaves: its slot comes back

        async def exported() -> bool:
            return (await t3.get(EXPORT, params=WINDOW, headers=CSV)).status_code == 200

        await eventually(exported)
        # That one was read to the end, and gave its slot back too.
        assert await exported()


@pytest.mark.parametrize("server", [{"export_max_s": 1.0}], indirect=True)
async def test_an_export_is_cut_after_its_time(server: str, make_token: Callable[..., str]) -> None:
    async with (
        client(server, make_token("t1")) as t1,
        t1.stream("GET", EXPORT, params=WINDOW, headers=CSV) as held,
    ):
        assert held.status_code == 200

        # Not read: cut after a second, the slot comes back.
        async def slot_free() -> bool:
            again = await t1.get(
                EXPORT, params={**WINDOW, "to": "2026-12-01T10:00:10Z"}, headers=CSV
            )
            return again.status_code == 200

        await eventually(slot_free)
        # What the held client reads ends short of the whole, and says so.
        with pytest.raises(httpx.RemoteProtocolError):
            async for _ in held.aiter_bytes():
                pass
