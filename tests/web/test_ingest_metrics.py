"""What /metrics says while ingest waits or fails: the operations audit found a 30 s
stall (telemetry locked) and 2,100 answers of 503 that no metric showed."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.support import provision_device, running_server
from tests.web.test_ingest import telemetry_url

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    async with running_server(settings) as url:
        yield url


async def sample(http: httpx.AsyncClient, name: str) -> float:
    text = (await http.get("/metrics")).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else 0.0


async def test_a_stalled_write_shows_and_a_failed_one_is_counted(
    url: str, pool: asyncpg.Pool, database_url: str
) -> None:
    token = await provision_device(pool, "t1", "dev-1")
    locker = await asyncpg.connect(database_url)
    held = locker.transaction()
    await held.start()
    await locker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        post = asyncio.create_task(
            http.post(
                telemetry_url(), json={"metrics": {"v": 1}}, headers={"X-Provision-Token": token}
            )
        )
        async with asyncio.timeout(20):  # the stall shows: one write, waiting ever longer
            while not (  # noqa: ASYNC110  (a scrape: no event to wait on)
                await sample(http, "pulse_ingest_in_flight") == 1
                and await sample(http, "pulse_ingest_oldest_in_flight_seconds") >= 0.5
            ):
                await asyncio.sleep(0.05)
        # Its connection dies while it waits: a 503, counted by its error.
        await locker.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'pulse' AND wait_event_type = 'Lock'"
        )
        response = await asyncio.wait_for(post, 20)
        assert response.status_code == 503, response.text
        assert await sample(http, 'pulse_ingest_failed_total{error="database_unavailable"}') == 1
        assert await sample(http, "pulse_ingest_in_flight") == 0
        assert await sample(http, "pulse_ingest_oldest_in_flight_seconds") == 0
    await held.rollback()
    await locker.close()
