"""Retention deletes old telemetry in batches; a resume from a trimmed position is told so."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from pulse.config import Settings
from pulse.db.retention import RETENTION_LOCK_KEY, trim_once
from tests.support import insert_readings, running_server, seam, sse_events

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"


async def age(pool: asyncpg.Pool, ids: list[int], hours: float) -> None:
    await pool.execute(
        "UPDATE telemetry SET received_at = now() - make_interval(secs => $2) WHERE id = ANY($1)",
        ids,
        hours * 3600,
    )


async def test_trim_deletes_only_old_rows_in_batches(pool: asyncpg.Pool) -> None:
    old = await insert_readings(pool, "t1", [("d1", {"v": i}) for i in range(120)])
    new = await insert_readings(pool, "t1", [("d1", {"v": i}) for i in range(30)])
    await age(pool, old, hours=200)
    cutoff = datetime.now(UTC) - timedelta(hours=168)
    assert await trim_once(seam(pool), cutoff, batch=50) == 120
    remaining = [r["id"] for r in await pool.fetch("SELECT id FROM telemetry ORDER BY id")]
    assert remaining == new
    assert await trim_once(seam(pool), cutoff) == 0


async def test_one_process_trims_at_a_time(pool: asyncpg.Pool) -> None:
    old = await insert_readings(pool, "t1", [("d1", {"v": 1})] * 10)
    await age(pool, old, hours=200)
    cutoff = datetime.now(UTC) - timedelta(hours=168)
    async with pool.acquire() as other, other.transaction():
        # Another process holds this turn: this one skips it.
        assert await other.fetchval("SELECT pg_try_advisory_xact_lock($1)", RETENTION_LOCK_KEY)
        assert await trim_once(seam(pool), cutoff) == 0
    assert await trim_once(seam(pool), cutoff) == 10


async def test_resume_from_trimmed_history(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    old = await insert_readings(pool, "t1", [("d1", {"v": i}) for i in range(5)])
    await insert_readings(pool, "t1", [("d1", {"v": i}) for i in range(3)])
    await age(pool, old, hours=2)
    # The server's own retention task trims with a one-hour window.
    fast = dataclasses.replace(settings, retention_hours=1.0, retention_interval_s=0.05)
    async with running_server(fast) as url:
        for _ in range(100):
            if await pool.fetchval("SELECT count(*) FROM telemetry") == 3:
                break
            await asyncio.sleep(0.05)
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as http,
            http.stream(
                "GET",
                SSE_PATH,
                headers={"Authorization": f"Bearer {make_token('t1')}", "Last-Event-ID": "2"},
            ) as r,
        ):
            got = []
            async for event in sse_events(r):
                got.append((event.event, event.id, event.data))
                if event.id == "8":
                    break
    assert got[0] == ("reset", None, '{"reason":"history_trimmed","earliest_id":6}')
    assert [i for _, i, _ in got[1:]] == ["6", "7", "8"]
