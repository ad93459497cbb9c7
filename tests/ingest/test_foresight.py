"""A tenant's next group inserts while the one ahead commits (pulse.ingest.ids); a
foresight proved wrong is rolled back and made again, and nothing is counted twice."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime

import asyncpg

from pulse.db.errors import DatabaseUnavailable
from pulse.ingest.model import Accepted, Device, Rejected, Submission
from pulse.ingest.validation import Reading
from pulse.ingest.writer import TelemetryWriter, Written
from tests.support import seam, until

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)

# Backends whose reservation waits for a tenant's row another transaction holds: a
# group that has inserted and waits, in PostgreSQL, for the one ahead to end.
RESERVATION_WAITING = """
SELECT count(*) FROM pg_stat_activity
 WHERE datname = current_database() AND state = 'active' AND wait_event_type = 'Lock'
   AND query LIKE 'SELECT r.tenant_id, pulse_reserve_event_ids%'
"""


def one(token: str, value: float) -> list[Submission]:
    return [Submission("t1", "dev-1", token, Reading(NOW, {"v": value}, None))]


async def ids(pool: asyncpg.Pool) -> list[int]:
    return [r["id"] for r in await pool.fetch("SELECT id FROM telemetry ORDER BY id")]


async def one_waits_after_its_insert(pool: asyncpg.Pool) -> None:
    """Until one group has inserted and its reservation waits for the one ahead (10 s
    at most)."""
    async with asyncio.timeout(10):
        while await pool.fetchval(RESERVATION_WAITING) != 1:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_the_next_group_inserts_while_the_one_ahead_is_open(
    pool: asyncpg.Pool, token: str
) -> None:
    release = asyncio.Event()
    held = asyncio.Event()

    async def hold_first(conn: asyncpg.Connection, written: Written) -> None:
        if not held.is_set():
            held.set()
            await release.wait()

    writer = TelemetryWriter(seam(pool), hooks=[hold_first])
    first = asyncio.ensure_future(writer.write(one(token, 0)))
    try:
        await asyncio.wait_for(held.wait(), 10)  # the first group is open, its id reserved
        second = asyncio.ensure_future(writer.write(one(token, 1)))
        # The second group's rows are in before the first commits.
        await one_waits_after_its_insert(pool)
        assert not second.done()
        assert await ids(pool) == []
    finally:
        release.set()
    assert await asyncio.wait_for(first, 10) == [Accepted(1)]
    assert await asyncio.wait_for(second, 10) == [Accepted(2)]
    assert await ids(pool) == [1, 2]
    assert (writer.ids.foreseen, writer.ids.wrong) == (1, 0)


async def test_ids_another_process_took_are_reserved_again(pool: asyncpg.Pool, token: str) -> None:
    admitted: list[int] = []
    remade: list[None] = []

    def admit(counts: Mapping[Device, int]) -> dict[Device, tuple[int, Rejected]]:
        admitted.extend(counts.values())
        return {}

    here = TelemetryWriter(seam(pool), admit=admit, on_remade=lambda: remade.append(None))
    there = TelemetryWriter(seam(pool))  # another process writing the same tenant
    assert await here.write(one(token, 0)) == [Accepted(1)]  # reserved first: it learns
    assert await there.write(one(token, 1)) == [Accepted(2)]
    # Here foresees id 2, inserts under it, reserves, gets 3: rolled back, made again.
    assert await here.write(one(token, 2)) == [Accepted(3)]
    assert (here.ids.foreseen, here.ids.wrong, len(remade)) == (1, 1, 1)
    assert admitted == [1, 1], "the second attempt does not take the rate twice"
    stored = await pool.fetch("SELECT id, (metrics->>'v')::int AS v FROM telemetry ORDER BY id")
    assert [(r["id"], r["v"]) for r in stored] == [(1, 0), (2, 1), (3, 2)]
    # The tenant is in doubt now: its writes reserve first for a while.
    assert await here.write(one(token, 3)) == [Accepted(4)]
    assert here.ids.foreseen == 1


async def test_a_group_behind_one_that_failed_is_made_again(pool: asyncpg.Pool, token: str) -> None:
    release = asyncio.Event()
    held = asyncio.Event()

    async def die_first(conn: asyncpg.Connection, written: Written) -> None:
        if not held.is_set():
            held.set()
            await release.wait()
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    writer = TelemetryWriter(seam(pool), hooks=[die_first])
    first = asyncio.ensure_future(writer.write(one(token, 0)))
    try:
        await asyncio.wait_for(held.wait(), 10)
        second = asyncio.ensure_future(writer.write(one(token, 1)))  # foresees id 2
        await until(lambda: writer.ids.foreseen == 1)
        await one_waits_after_its_insert(pool)
    finally:
        release.set()
    try:
        await asyncio.wait_for(first, 10)
    except DatabaseUnavailable:
        pass
    else:
        raise AssertionError("the first group's connection died before its commit")
    # The second group's id 2 was never its own: made again, it takes id 1.
    assert await asyncio.wait_for(second, 10) == [Accepted(1)]
    assert await ids(pool) == [1]
    assert writer.ids.wrong == 1
    # A write ahead that failed casts no doubt: the next write foresees again.
    assert await writer.write(one(token, 2)) == [Accepted(2)]
    assert writer.ids.foreseen == 2
