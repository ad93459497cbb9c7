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


async def test_a_transaction_that_may_end_itself(database_url: str) -> None:
    """``transaction_ending_itself``: committed when the block ends with it open, left
    alone when the block committed it (one string ending in COMMIT), rolled back when
    the block raises, even after a statement failed inside it."""
    async with Database.open(database_url, pool_size=1) as db:
        await db.execute("CREATE TABLE probe (n int PRIMARY KEY)")
        async with db.transaction_ending_itself() as conn:
            await conn.execute("INSERT INTO probe VALUES (1)")
        async with db.transaction_ending_itself() as conn:
            await conn.execute("INSERT INTO probe VALUES (2); COMMIT")
            assert not conn.is_in_transaction()
            pid = await conn.fetchval("SELECT pg_backend_pid() /* after its own commit */")
        # Nothing more was sent: no COMMIT of a transaction that is over.
        assert await last_statement(db, pid) == "SELECT pg_backend_pid() /* after its own commit */"
        for statement in ("INSERT INTO probe VALUES (3)", "INSERT INTO probe VALUES (1)"):
            try:
                async with db.transaction_ending_itself() as conn:
                    await conn.execute("INSERT INTO probe VALUES (4)")
                    await conn.execute(statement)  # the second fails: a duplicate key
                    raise LookupError("the block fails")
            except LookupError:
                pass
            except Exception as exc:
                assert "duplicate key" in str(exc)
            async with db.connection() as conn:
                assert not conn.is_in_transaction()
        assert [r["n"] for r in await db.fetch("SELECT n FROM probe ORDER BY n")] == [1, 2]


async def test_pool_connections_are_named_unless_the_url_names_them(database_url: str) -> None:
    """From the operations audit: the pool's connections had no name in
    pg_stat_activity, beside "pulse listener", "pulse rollups" and "pulse sweeper"."""
    async with Database.open(database_url, pool_size=1) as db:
        assert await db.fetchval("SHOW application_name") == "pulse"
    joiner = "&" if "?" in database_url else "?"
    async with Database.open(f"{database_url}{joiner}application_name=ours", pool_size=1) as db:
        assert await db.fetchval("SHOW application_name") == "ours"
