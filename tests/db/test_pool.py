"""The pool: a connection goes back without a reset round trip, and still clean."""

from __future__ import annotations

import asyncio
import time

from pulse.db.database import Database


async def last_statement(db: Database, pid: int) -> str:
    """What pg_stat_activity says the backend ``pid`` ran last, once it is idle (asked on
    a connection of its own, outside the pool)."""
    deadline = time.monotonic() + 10
    async with db.dedicated("pool probe") as probe:
        while True:
            row = await probe.fetchrow(
                "SELECT state, query FROM pg_stat_activity WHERE pid = $1", pid
            )
            if row["state"] == "idle" or time.monotonic() > deadline:
                return str(row["query"])
            await asyncio.sleep(0.02)


async def test_a_released_connection_is_not_sent_a_reset(database_url: str) -> None:
    async with Database.open(database_url, pool_size=2) as db:
        async with db.connection() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid() /* the caller's */")
        # asyncpg's default would now show SELECT pg_advisory_unlock_all(); ... RESET ALL.
        assert await last_statement(db, pid) == "SELECT pg_backend_pid() /* the caller's */"


async def test_a_transaction_left_open_is_still_rolled_back(database_url: str) -> None:
    async with Database.open(database_url, pool_size=1) as db:
        async with db.connection() as conn:
            await conn.execute("CREATE TABLE probe (n int)")
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("INSERT INTO probe VALUES (1)")
            # released with the transaction open, as a cancelled task would leave it
        async with db.connection() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT count(*) FROM probe") == 0


async def test_connections_never_compile_statements_with_jit(database_url: str) -> None:
    async with Database.open(database_url, pool_size=1) as db:
        async with db.connection() as conn:
            assert await conn.fetchval("SHOW jit") == "off"
        async with db.dedicated("jit probe") as conn:
            assert await conn.fetchval("SHOW jit") == "off"
