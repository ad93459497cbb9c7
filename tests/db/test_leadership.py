"""Asking whether a cluster-wide job's lock is free takes nothing: the pooled connection
that asks holds no lock after, and a lock another session holds is seen as taken."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from pulse.db import database
from pulse.db.database import DEDICATED_KEEPALIVES, Database, pause
from pulse.db.errors import DatabaseUnavailable
from pulse.db.leadership import lock_is_free
from tests.support import seam

KEY = 0x70756C73_65_7465  # "pulse" "te"


async def advisory_holders(pool: asyncpg.Pool) -> list[int]:
    rows = await pool.fetch(
        """SELECT pid FROM pg_locks
            WHERE locktype = 'advisory' AND granted AND database = (
                  SELECT oid FROM pg_database WHERE datname = current_database())
              AND (classid::bigint << 32) | objid::bigint = $1""",
        KEY,
    )
    return [row["pid"] for row in rows]


async def test_asking_takes_nothing(pool: asyncpg.Pool) -> None:
    db = seam(pool)
    assert await lock_is_free(db, KEY)
    assert await advisory_holders(pool) == []  # asked, taken and let go in one statement
    async with pool.acquire() as leader:
        assert await leader.fetchval("SELECT pg_try_advisory_lock($1)", KEY)
        assert not await lock_is_free(db, KEY)
        assert await advisory_holders(pool) == [await leader.fetchval("SELECT pg_backend_pid()")]
        await leader.execute("SELECT pg_advisory_unlock($1)", KEY)
    assert await lock_is_free(db, KEY)


async def test_a_leaders_connection_asks_for_prompt_keepalives(database_url: str) -> None:
    """Every lead (the sweeper, the rollups, the relay) is held on a dedicated connection,
    which asks the server for TCP keepalives of seconds: a leader whose machine vanished
    loses its lock then, not after the kernel's two hours."""
    async with Database.open(database_url, pool_size=1) as db, db.dedicated("probe") as conn:
        rows = await conn.fetch(
            "SELECT name, setting, source FROM pg_settings WHERE name LIKE 'tcp_keepalives_%'"
        )
        tcp = await conn.fetchval("SELECT inet_client_addr() IS NOT NULL")
    asked = {row["name"]: row["source"] for row in rows}
    assert asked == dict.fromkeys(DEDICATED_KEEPALIVES, "client")
    if tcp:  # over a Unix socket the server reads them all as 0: no keepalives there
        assert {row["name"]: row["setting"] for row in rows} == DEDICATED_KEEPALIVES


async def test_a_silent_leaders_connection_is_ended_unless_it_pauses_alive(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dedicated connection that sends nothing for DEDICATED_SILENCE_S is ended by
    PostgreSQL (a stopped or hung process loses its lead); ``pause`` waits longer than
    that with a statement every ALIVE_EVERY_S, as the rollups' leader waits between
    passes."""
    monkeypatch.setattr(database, "DEDICATED_SILENCE_S", 1)
    monkeypatch.setattr(database, "ALIVE_EVERY_S", 0.3)
    async with Database.open(database_url, pool_size=1) as db:
        async with db.dedicated("probe") as conn:
            assert await conn.fetchval("SHOW idle_session_timeout") == "1s"
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "1s"
            assert await conn.fetchval("SHOW client_connection_check_interval") == "1s"
            await pause(conn, 2.5)
            assert await conn.fetchval("SELECT 1") == 1
        with pytest.raises(DatabaseUnavailable):
            async with db.dedicated("probe") as conn:
                await asyncio.sleep(2.5)  # silent: ended
                await conn.fetchval("SELECT 1")
