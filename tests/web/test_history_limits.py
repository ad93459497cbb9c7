"""The history API's JSON answers on a real server: a page of readings is cut by its
size, and how many answers are read and sent at once is bounded per tenant and per
process (finding A of the abuse audit: 60 connections that read only the head of
16.5 MB pages held 1.2 GB)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from pulse.history.params import MAX_PAGE_BYTES
from pulse.web import runtime_of
from tests.history.readings import readings_at
from tests.support import provision_device, running_server

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
DEVICE = "/api/v1/customer/devices/d1/telemetry"
WINDOW = {"from": "2026-12-01T10:00:00Z", "to": "2026-12-01T11:00:00Z"}
METRICS = 200  # the most a reading may have


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@dataclasses.dataclass
class Served:
    url: str
    app: Any = None


@pytest.fixture
async def server(
    settings: Settings, pool: asyncpg.Pool, request: pytest.FixtureRequest
) -> AsyncIterator[Served]:
    for tenant in ("t1", "t2", "t3"):
        await provision_device(pool, tenant, "d1")
    limits = dataclasses.replace(settings, rollup_interval_s=3600, **getattr(request, "param", {}))
    served = Served("")
    async with running_server(limits, on_app=lambda app: setattr(served, "app", app)) as url:
        served.url = url
        yield served


def client(url: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=20, headers={"Authorization": f"Bearer {token}"})


async def test_a_page_of_big_readings_is_cut_by_bytes_and_resumes_exactly(
    server: Served, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    # 300 readings of 200 metrics (about 5 KB of JSON each: 1.5 MB in all), three at
    # each device time, so that the cut falls among readings of one time.
    big = {f"metric_{m:03d}": 1000.0 + m + 0.125 for m in range(METRICS)}
    ids = await readings_at(
        pool, "t1", [("d1", T0 + timedelta(seconds=i // 3), big) for i in range(300)]
    )
    seen: list[int] = []
    sizes: list[int] = []
    async with client(server.url, make_token("t1")) as t1:
        params = {**WINDOW, "bucket": "raw", "limit": "10000"}
        while True:
            page = await t1.get(DEVICE, params=params)
            assert page.status_code == 200, page.text
            body = json.loads(page.content)
            sizes.append(len(page.content))
            assert page.headers["Content-Length"] == str(len(page.content))
            seen += [reading["id"] for reading in body["readings"]]
            if body["next"] is None:
                break
            params["cursor"] = body["next"]
    reading = len(json.dumps({"id": ids[-1], "time": "x" * 24, "metrics": big}))
    assert len(sizes) == 2, sizes  # cut once by bytes, not by the limit of 10,000
    assert MAX_PAGE_BYTES - 2 * reading < sizes[0] <= MAX_PAGE_BYTES + reading
    assert seen == ids  # every reading once, in order, across the cut
    assert runtime_of(server.app).history_reads.held == 0


@pytest.mark.parametrize(
    "server", [{"max_history_reads": 2, "max_history_reads_per_tenant": 1}], indirect=True
)
async def test_json_answers_at_once_are_bounded_per_tenant_and_process(
    server: Served, pool: asyncpg.Pool, database_url: str, make_token: Callable[..., str]
) -> None:
    for tenant in ("t1", "t2", "t3"):
        await readings_at(pool, tenant, [("d1", T0, {"v": 1.0})])
    slots = runtime_of(server.app).history_reads
    # The lock is held on a connection of its own: a pooled one is ended after 15 s
    # idle in its transaction (pulse.db.pool), which a busy machine can reach.
    locker = await asyncpg.connect(database_url)
    async with (
        client(server.url, make_token("t1")) as t1,
        client(server.url, make_token("t2")) as t2,
        client(server.url, make_token("t3")) as t3,
    ):
        # Readers wait on the readings while the test holds them locked: their
        # answers are being read, and hold their slots.

        async def waiting(readers: int) -> bool:
            # Their slots taken, whatever else waits on the lock (the server's partition
            # upkeep may, on a busy machine).
            return slots.held == readers

        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
        try:
            page = asyncio.create_task(t1.get(DEVICE, params={**WINDOW, "bucket": "raw"}))
            await eventually(lambda: waiting(1))
            again = await t1.get(DEVICE, params=WINDOW)
            assert again.status_code == 429, again.text
            assert again.json()["error"] == "history_limit"
            assert "tenant reads 1 history answer" in again.json()["detail"]
            assert again.headers["Retry-After"] == "1"
            # Another tenant's buckets take the process's second slot.
            chart = asyncio.create_task(t2.get(DEVICE, params=WINDOW))
            await eventually(lambda: waiting(2))
            full = await t3.get(DEVICE, params=WINDOW)
            assert full.status_code == 429 and "This server reads" in full.json()["detail"]
            scraped = (await t3.get("/metrics")).text
            assert "\npulse_history_reads 2.0\n" in scraped, scraped
            fleet = await t3.get("/api/v1/customer/telemetry/history", params={"metric": "v"})
            assert fleet.status_code == 429, fleet.text
        finally:
            await lock.rollback()
            await locker.close()
        assert (await page).status_code == 200
        assert (await chart).status_code == 200
        assert slots.held <= 2
        # Sent: their slots are back.
        await eventually(lambda: _true(slots.held == 0))
        assert (await t1.get(DEVICE, params=WINDOW)).status_code == 200
        assert (await t3.get(DEVICE, params=WINDOW)).status_code == 200


async def _true(value: bool) -> bool:
    return value
