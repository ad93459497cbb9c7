"""The read of a tenant's newest id: one deadline (NEWEST_WAIT_S) per caller."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pulse.bus import store as store_module
from pulse.bus.store import EventStore
from pulse.db.errors import DatabaseUnavailable
from tests.support import seam


async def test_a_newest_id_waiting_for_a_pooled_connection_is_refused_at_its_deadline(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of d13e826: the deadline covered the statement only, and acquiring the
    connection waited on: with every pooled connection held (as each is while the
    database does not answer, up to command_timeout, 60 s) the read waited past it."""
    monkeypatch.setattr(store_module, "NEWEST_WAIT_S", 0.2)
    held = [await pool.acquire() for _ in range(pool.get_max_size())]
    try:
        async with asyncio.timeout(10):  # unbounded before: held until released
            with pytest.raises(DatabaseUnavailable):
                await EventStore(seam(pool)).newest_id("t1")
    finally:
        for conn in held:
            await pool.release(conn)


async def test_a_caller_arriving_during_a_read_gives_up_at_its_own_deadline(
    pool: asyncpg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review of d13e826: a caller arriving while a read is in flight waited for that read
    to end, then for a read of its own, each with the whole budget (2x NEWEST_WAIT_S).
    Now it gives up at its own deadline, whatever its own read is doing then."""
    # The first caller's deadline is long: on a busy machine its read must still be
    # waiting on the lock when the second caller comes (each reads the bound as it calls).
    monkeypatch.setattr(store_module, "NEWEST_WAIT_S", 60.0)
    store = EventStore(seam(pool))
    locker = await asyncpg.connect(database_url)
    lock = locker.transaction()
    await lock.start()
    await locker.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
    try:
        first = asyncio.create_task(store.newest_id("t1"))
        # The first read is waiting on the lock before the second caller comes.
        async with asyncio.timeout(30):
            while not await waiting_on_the_lock(locker):  # noqa: ASYNC110  the server's view
                await asyncio.sleep(0)
        monkeypatch.setattr(store_module, "NEWEST_WAIT_S", 1.0)
        with pytest.raises(DatabaseUnavailable):
            await asyncio.wait_for(store.newest_id("t1"), 10)
        # Given up while the read it waited for was still in flight; before, only once
        # that read had ended (here: never, while the lock is held).
        assert "t1" in store._newest._flights, "it waited for the read in flight to end"
        assert not first.done()
    finally:
        await lock.rollback()
        await locker.close()
    assert await asyncio.wait_for(first, 10) >= 0  # the lock gone, the first read ends


async def waiting_on_the_lock(conn: asyncpg.Connection) -> bool:
    """Whether a read of a tenant's newest id waits on a lock on the server.

    ``conn`` holds the lock in a transaction, and PostgreSQL shows a transaction the
    same pg_stat_activity throughout: taken before the read came, that snapshot never
    showed it waiting (a clean-clone CI run polled it for 30 s). Each poll drops it."""
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%last_event_id FROM tenants%'"
        )
    )
