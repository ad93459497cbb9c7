"""A write that no transaction takes in time is refused, with nothing of it written.

From the operations audit: with PostgreSQL frozen for 30 s, ingest requests waited the
whole time (up to asyncpg's 60 s) and were then stored and answered 201; 200 requests
whose clients had given up after 15 s were committed later, so each client's retry
stored its readings twice. A write still queued after ``wait_s`` is now answered
unavailable (503 with Retry-After) and never written; one whose transaction began has
its outcome, however long it takes.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg
import pytest

from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.pool import create_pool
from pulse.ingest.model import Accepted, Submission
from pulse.ingest.validation import Reading
from pulse.ingest.writer import CHECK_AHEAD_FROM, TelemetryWriter, Written
from tests.ingest.test_foresight import one_waits_after_its_insert
from tests.support import seam

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
WAIT_S = 0.5


def readings(token: str, *values: float) -> list[Submission]:
    return [Submission("t1", "dev-1", token, Reading(NOW, {"v": v}, None)) for v in values]


async def stored(pool: asyncpg.Pool) -> list[float]:
    rows = await pool.fetch("SELECT metrics FROM telemetry ORDER BY id")
    return [row["metrics"]["v"] for row in rows]


async def test_a_queued_write_is_refused_after_wait_s_and_a_begun_one_is_not(
    pool: asyncpg.Pool, token: str
) -> None:
    release = asyncio.Event()
    held = asyncio.Event()

    async def stuck(conn: asyncpg.Connection, written: Written) -> None:
        """The first transaction does not end: a database that stopped answering."""
        if not held.is_set():
            held.set()
            await release.wait()

    writer = TelemetryWriter(seam(pool), hooks=[stuck], wait_s=WAIT_S)
    first = asyncio.ensure_future(writer.write(readings(token, 1)))
    try:
        await asyncio.wait_for(held.wait(), 10)
        # The second begins beside the first (two transactions in flight at most); the
        # third waits for a transaction, then is refused.
        second = asyncio.ensure_future(writer.write(readings(token, 2)))
        await one_waits_after_its_insert(pool)
        third = asyncio.ensure_future(writer.write(readings(token, 3)))
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="nothing of it was stored"):
            await asyncio.wait_for(third, 10)
        assert time.monotonic() - started >= WAIT_S * 0.9
        # The second, begun before the third came, has waited longer than wait_s too.
        assert not first.done() and not second.done()
    finally:
        release.set()
    assert await asyncio.wait_for(first, 10) == [Accepted(1)]
    assert await asyncio.wait_for(second, 10) == [Accepted(2)]
    assert await stored(pool) == [1, 2]
    # Once the database answers again, writes go through as ever.
    assert await asyncio.wait_for(writer.write(readings(token, 4)), 10) == [Accepted(3)]


async def test_a_large_write_whose_checks_do_not_come_is_refused(
    pool: asyncpg.Pool, token: str, database_url: str
) -> None:
    """Large writes are checked before they queue (``_check``): a check the database
    does not answer refuses the write after ``wait_s`` too."""
    writer = TelemetryWriter(seam(pool), wait_s=WAIT_S)
    locker = await asyncpg.connect(database_url)  # not pooled: idle in its lock for long
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(DatabaseUnavailable, match="could not be checked"):
            await asyncio.wait_for(writer.write(readings(token, *range(CHECK_AHEAD_FROM))), 10)
        await lock.rollback()
    finally:
        await locker.close()
    assert await stored(pool) == []
    outcomes = await asyncio.wait_for(writer.write(readings(token, *range(CHECK_AHEAD_FROM))), 20)
    assert len(outcomes) == CHECK_AHEAD_FROM and all(isinstance(o, Accepted) for o in outcomes)


async def test_a_group_that_gets_no_connection_in_time_is_refused_unbegun(
    pool: asyncpg.Pool, token: str, database_url: str
) -> None:
    """From the review of the change above: a group taken from the queue waited for a
    pooled connection with no bound (every one held by a statement a frozen database
    does not end), and was written whenever one came, long after its clients gave up."""
    one = await create_pool(database_url, max_size=1)
    try:
        writer = TelemetryWriter(Database(one, database_url), wait_s=WAIT_S)
        held = await one.acquire()  # the only connection, busy for as long as it likes
        try:
            with pytest.raises(DatabaseUnavailable, match="no database connection came free"):
                await asyncio.wait_for(writer.write(readings(token, 1)), 10)
        finally:
            await one.release(held)
        assert await stored(pool) == []
        assert await asyncio.wait_for(writer.write(readings(token, 2)), 10) == [Accepted(1)]
        assert await stored(pool) == [2]
    finally:
        await one.close()
