"""At a stop, a write whose COMMIT has gone out is let finish (``TelemetryWriter.stop``).

From the review of the shutdown fixes (8f7cac0): the stop cancelled every write in
flight, and a cancel cannot undo a COMMIT that has reached the database: 0 to 2 of 400
writes stopped at once were answered 503 and stored all the same, so a client that
retried stored them twice. Now a write whose COMMIT went out has a grace to finish and
is answered what happened; only one still committing after it (a database that stopped
answering) is ended, and answered 503, as before.

The COMMIT is held in PostgreSQL by a deferred constraint trigger that waits for an
advisory lock the test holds: a COMMIT that has reached the database and not ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from pulse.db import database
from pulse.db.errors import DatabaseUnavailable
from pulse.ingest.model import Accepted, Outcome, Submission
from pulse.ingest.validation import Reading
from pulse.ingest.writer import TelemetryWriter, Written
from tests.support import provision_device, seam

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
LOCK = 4242

COMMIT_WAITS = f"""
CREATE FUNCTION test_commit_waits() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock({LOCK});
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER test_commit_waits AFTER INSERT ON telemetry
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_commit_waits();
"""

COMMIT_WAITING = """
SELECT query FROM pg_stat_activity
 WHERE datname = current_database() AND wait_event = 'advisory'
"""


def one(token: str, value: float) -> list[Submission]:
    return [Submission("t1", "dev-1", token, Reading(NOW, {"v": value}, None))]


async def no_op(conn: asyncpg.Connection, written: Written) -> None:
    """A hook: the write commits at its transaction's end, not with its reservation."""


@pytest.fixture
async def held_commit(database_url: str, pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection that will hold the lock every COMMIT of a reading waits for
    (``hold``)."""
    await pool.execute(COMMIT_WAITS)
    holder = await asyncpg.connect(database_url)
    yield holder
    await holder.close()


async def held(
    pool: asyncpg.Pool, token: str, holder: asyncpg.Connection, **options: Any
) -> TelemetryWriter:
    """A writer, once its first reading (0) has made the device ONLINE and fresh and
    told it the tenant's ids, so that its next write may foresee its ids and commit with
    its reservation, in one round trip (``_take_and_commit``); then the COMMITs wait."""
    # The device stays fresh however slowly the test runs.
    writer = TelemetryWriter(seam(pool), seen_precision_s=3600, **options)
    assert await writer.write(one(token, 0)) == [Accepted(1)]
    await holder.execute("SELECT pg_advisory_lock($1)", LOCK)
    return writer


async def commit_waits(pool: asyncpg.Pool) -> str:
    """The statement of the COMMIT waiting in the trigger, once there is one."""
    async with asyncio.timeout(10):
        while (query := await pool.fetchval(COMMIT_WAITING)) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    return str(query)


async def stored(pool: asyncpg.Pool) -> list[float]:
    rows = await pool.fetch("SELECT metrics FROM telemetry ORDER BY id")
    return [row["metrics"]["v"] for row in rows]


@pytest.mark.parametrize(
    ("group_commit", "commit"),
    [
        (True, "with the reservation"),
        (True, "at the transaction's end"),
        (False, "at the transaction's end"),  # without group commit, never foreseen
    ],
)
async def test_a_write_whose_commit_went_out_finishes_and_is_answered(
    pool: asyncpg.Pool, token: str, held_commit: asyncpg.Connection, group_commit: bool, commit: str
) -> None:
    hooks = [no_op] if commit == "at the transaction's end" else []
    stopping = await held(pool, token, held_commit, hooks=hooks, group_commit=group_commit)
    write = asyncio.ensure_future(stopping.write(one(token, 1)))
    query = await commit_waits(pool)
    assert query.startswith("SELECT pulse_take_foreseen_ids") == (not hooks), query
    stopping.stop(grace_s=10)
    await held_commit.execute("SELECT pg_advisory_unlock($1)", LOCK)
    assert await asyncio.wait_for(write, 10) == [Accepted(2)]
    assert await stored(pool) == [0, 1]
    # Nothing begins after the stop.
    with pytest.raises(DatabaseUnavailable, match="shutting down"):
        await stopping.write(one(token, 2))


async def test_a_commit_that_does_not_come_back_within_the_grace_is_answered_503(
    pool: asyncpg.Pool, token: str, held_commit: asyncpg.Connection
) -> None:
    """The database does not answer the COMMIT (here: it waits on a lock): the stop
    still answers within its grace, and says the write is not known to be committed."""
    stopping = await held(pool, token, held_commit)
    write = asyncio.ensure_future(stopping.write(one(token, 1)))
    await commit_waits(pool)
    started = time.monotonic()
    stopping.stop(grace_s=0.3)
    with pytest.raises(DatabaseUnavailable, match="not known to be committed"):
        await asyncio.wait_for(write, 10)
    assert 0.25 <= time.monotonic() - started < 5
    # Cancelled while its COMMIT waited in the trigger: rolled back once the cancel
    # reaches the server (asyncpg sends it on a connection of its own, after the
    # answer: a lock released before then would let the COMMIT through, which is why
    # the answer is "not known").
    async with asyncio.timeout(10):
        while await pool.fetchval(COMMIT_WAITING) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    await held_commit.execute("SELECT pg_advisory_unlock($1)", LOCK)
    assert await stored(pool) == [0]


async def test_a_write_not_yet_committing_is_ended_at_once(
    pool: asyncpg.Pool, token: str, held_commit: asyncpg.Connection
) -> None:
    """Beside a committing write, the next group (waiting on the tenant's row it holds,
    its COMMIT not sent) is ended at the stop, not given the grace. (A hook: writes
    reserve apart from their COMMIT. One that reserves and commits in one message,
    ``_take_and_commit``, has sent its COMMIT, and is given the grace.)"""
    stopping = await held(pool, token, held_commit, hooks=[no_op])
    first = asyncio.ensure_future(stopping.write(one(token, 1)))
    await commit_waits(pool)
    second = asyncio.ensure_future(stopping.write(one(token, 2)))
    async with asyncio.timeout(10):  # the second has inserted and waits for the first
        while not await pool.fetchval(  # noqa: ASYNC110
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE '%pulse_reserve_event_ids%'"
        ):
            await asyncio.sleep(0.005)
    stopping.stop(grace_s=10)
    with pytest.raises(DatabaseUnavailable, match="not known to be committed"):
        await asyncio.wait_for(second, 5)
    assert not first.done()
    await held_commit.execute("SELECT pg_advisory_unlock($1)", LOCK)
    assert await asyncio.wait_for(first, 10) == [Accepted(2)]
    assert await stored(pool) == [0, 1]


async def test_a_stop_just_after_a_commit_ended_leaves_its_answer(
    pool: asyncpg.Pool, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by probing: a transaction that had committed and returned, its callers not
    yet told (its done callbacks not yet run), was taken for one in flight: its callers
    got a 503 for readings stored (6 of 60 stops amid 400 writes). The stop comes here
    in the first of the transaction's done callbacks, before ``_settle``."""
    track = TelemetryWriter._track

    def stop_first(
        writer: TelemetryWriter, commit: asyncio.Task[list[Outcome]], callers: Any
    ) -> None:
        commit.add_done_callback(lambda _: writer.stop())
        track(writer, commit, callers)

    monkeypatch.setattr(TelemetryWriter, "_track", stop_first)
    writer = TelemetryWriter(seam(pool))
    assert await asyncio.wait_for(writer.write(one(token, 1)), 10) == [Accepted(1)]
    assert await stored(pool) == [1]


async def test_a_write_committed_and_still_marking_its_device_at_the_grace_is_answered(
    pool: asyncpg.Pool, token: str, held_commit: asyncpg.Connection
) -> None:
    """A write that committed with its reservation after waiting past the precision
    marks its devices seen in a transaction of its own (``_mark_seen_late``): when that
    is stuck at the end of the grace (the device's row locked here), the write is
    committed and its caller is told so, 201, not 503."""
    precision_s = 0.2
    stopping = await held(pool, token, held_commit)
    stopping._seen_precision_s = precision_s  # the device was fresh when checked: no longer
    write = asyncio.ensure_future(stopping.write(one(token, 1)))
    assert (await commit_waits(pool)).startswith("SELECT pulse_take_foreseen_ids")
    await asyncio.sleep(precision_s * 2)  # the check's judgement lapses (a time, not an event)
    row = held_commit.transaction()
    await row.start()
    await held_commit.execute("SELECT 1 FROM devices WHERE device_id = 'dev-1' FOR UPDATE")
    await held_commit.execute("SELECT pg_advisory_unlock($1)", LOCK)
    async with asyncio.timeout(10):  # committed; marking the device waits for its row
        while not await pool.fetchval(  # noqa: ASYNC110
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE 'WITH seen AS%'"
        ):
            await asyncio.sleep(0.005)
    stopping.stop(grace_s=0.3)
    assert await asyncio.wait_for(write, 10) == [Accepted(2)]
    await row.rollback()
    assert await stored(pool) == [0, 1]


async def test_a_write_spared_at_a_stop_is_not_made_again_after_it(
    pool: asyncpg.Pool, token: str, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the review of the stop's grace (HIGH): write B, its reservation and COMMIT
    sent in one string, waits in PostgreSQL for the tenant's row, held by write A, which
    reserved apart from its COMMIT. The stop spares B and ends A; A's rollback makes B's
    foreseen ids wrong, and B began a whole new transaction after the stop, which
    ``_give_up`` no longer saw. Now B is answered 503 then, unwritten."""
    token2 = await provision_device(pool, "t1", "dev-2")
    writer = TelemetryWriter(seam(pool), seen_precision_s=3600)
    begun_after_stop: list[object] = []
    begin = writer._db.transaction_ending_itself

    def spy(**options: Any) -> Any:
        if writer._stopped:
            begun_after_stop.append(options)
        return begin(**options)

    monkeypatch.setattr(writer._db, "transaction_ending_itself", spy)
    assert await writer.write(one(token, 0)) == [Accepted(1)]  # dev-1 ONLINE and fresh
    holder = await asyncpg.connect(database_url)
    row = holder.transaction()
    await row.start()
    await holder.execute("SELECT 1 FROM devices WHERE device_id = 'dev-2' FOR UPDATE")
    # A: dev-2 comes online, so it reserves apart from its COMMIT; then waits on its row.
    a = asyncio.ensure_future(
        writer.write([Submission("t1", "dev-2", token2, Reading(NOW, {"v": 1}, None))])
    )
    await lock_waits(pool, "WITH seen AS%")
    b = asyncio.ensure_future(writer.write(one(token, 2)))
    await lock_waits(pool, "SELECT pulse_take_foreseen_ids%")
    writer.stop(grace_s=30)
    with pytest.raises(DatabaseUnavailable, match="shutting down"):
        await asyncio.wait_for(a, 10)
    with pytest.raises(DatabaseUnavailable, match="shutting down"):
        await asyncio.wait_for(b, 10)  # not at the grace's end: once A has rolled back
    await row.rollback()
    await holder.close()
    assert begun_after_stop == []
    assert await stored(pool) == [0]


async def lock_waits(pool: asyncpg.Pool, query: str) -> None:
    """Until a backend whose statement is like ``query`` waits for a lock (10 s at most)."""
    async with asyncio.timeout(10):
        while not await pool.fetchval(  # noqa: ASYNC110
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE $1",
            query,
        ):
            await asyncio.sleep(0.005)


async def test_a_write_queued_as_the_stop_comes_is_answered_by_it(
    pool: asyncpg.Pool, token: str
) -> None:
    """From the review (MEDIUM): a write queued for its tenants' committer in the same
    turn of the loop as the stop: the committer, cancelled before its first step, never
    ran the finally that answers what waits, and the write waited for its wait_s (past
    the server's timeout: a cut connection)."""
    writer = TelemetryWriter(seam(pool), wait_s=30)
    write = asyncio.ensure_future(writer.write(one(token, 1)))
    await asyncio.sleep(0)  # one step: queued, its committer created, not yet run
    assert len(writer._committers) == 1
    writer.stop()
    with pytest.raises(DatabaseUnavailable, match="shutting down"):
        await asyncio.wait_for(write, 5)
    assert await stored(pool) == []


async def test_a_committed_write_is_answered_whatever_befalls_its_connection_after(
    pool: asyncpg.Pool, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the review (LOW): a write was known committed only once its connection was
    back in the pool; a stop's grace ending meanwhile answered it 503, and a release
    that failed (asyncpg raises the reset's error) failed the write. Both are answered
    what they are: committed."""
    writer = TelemetryWriter(seam(pool), hooks=[no_op])  # COMMIT at the block's end
    released = asyncio.Event()
    held_back = asyncio.Event()

    @contextlib.asynccontextmanager
    async def slow_release(pool: asyncpg.Pool, conn: Any) -> AsyncIterator[Any]:
        try:
            yield conn
        finally:
            held_back.set()

            async def when_released() -> None:
                await released.wait()
                await pool.release(conn)

            # Shielded, as asyncpg's own release is: a cancel leaves it to finish.
            await asyncio.shield(when_released())

    monkeypatch.setattr(database, "_released", slow_release)
    write = asyncio.ensure_future(writer.write(one(token, 1)))
    await asyncio.wait_for(held_back.wait(), 10)
    writer.stop(grace_s=0.2)
    assert await asyncio.wait_for(write, 10) == [Accepted(1)]
    released.set()

    @contextlib.asynccontextmanager
    async def failing_release(pool: asyncpg.Pool, conn: Any) -> AsyncIterator[Any]:
        try:
            yield conn
        finally:
            await pool.release(conn)
            raise asyncpg.InterfaceError("the connection's reset failed")

    monkeypatch.setattr(database, "_released", failing_release)
    assert await TelemetryWriter(seam(pool), hooks=[no_op]).write(one(token, 2)) == [Accepted(2)]
    assert await stored(pool) == [1, 2]
