"""The pool: a connection goes back without a reset round trip, and still clean."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import asyncpg
import pytest

from pulse.db import pool as pool_module
from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.pool import IDLE_IN_WRITE_S, KEEPALIVES, create_pool
from pulse.history import reads


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


async def test_a_transaction_whose_connection_is_lost_raises_what_happened(
    database_url: str,
) -> None:
    """From the chaos audit: a connection terminated inside ``transaction_ending_itself``
    raised ``cannot call Connection.is_closed(): connection has been released back to
    the pool`` (asyncpg detaches a lost connection's proxy at once), and the operator's
    log said that instead of the connection's loss."""
    async with Database.open(database_url, pool_size=2) as db:
        with pytest.raises(DatabaseUnavailable) as raised:
            async with db.transaction_ending_itself() as conn:
                # Its own statement ends it: terminated from another session, the
                # connection may be found lost before the block's next statement.
                await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        assert "released back to the pool" not in str(raised.value)
        assert "terminat" in str(raised.value) or "closed" in str(raised.value), raised.value
        assert await db.fetchval("SELECT 1") == 1  # the pool goes on


async def test_pool_connections_are_named_unless_the_url_names_them(database_url: str) -> None:
    """From the operations audit: the pool's connections had no name in
    pg_stat_activity, beside "pulse listener", "pulse rollups" and "pulse sweeper"."""
    async with Database.open(database_url, pool_size=1) as db:
        assert await db.fetchval("SHOW application_name") == "pulse"
    joiner = "&" if "?" in database_url else "?"
    async with Database.open(f"{database_url}{joiner}application_name=ours", pool_size=1) as db:
        assert await db.fetchval("SHOW application_name") == "ours"


async def test_a_pooled_connection_asks_for_keepalives_and_a_bound_on_idle_writes(
    database_url: str,
) -> None:
    async with Database.open(database_url, pool_size=1) as db, db.connection() as conn:
        settings = dict(
            await conn.fetch(
                "SELECT name, setting FROM pg_settings WHERE name LIKE 'tcp_keepalives_%' "
                "OR name = 'idle_in_transaction_session_timeout'"
            )
        )
        tcp = await conn.fetchval("SELECT inet_client_addr() IS NOT NULL")
    assert settings["idle_in_transaction_session_timeout"] == str(IDLE_IN_WRITE_S * 1000)
    if tcp:  # over a Unix socket the server reads them all as 0: no keepalives there
        assert {k: v for k, v in settings.items() if k.startswith("tcp_")} == KEEPALIVES


async def test_a_writer_stopped_mid_write_does_not_hold_its_tenant_for_ever(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the delivery audit: a process stopped (SIGSTOP) inside a write held its
    tenant's row, and every process's writes of that tenant waited for it (503 after
    60 s; a vanished machine, about two hours). PostgreSQL now ends a pooled connection
    idle in a transaction for IDLE_IN_WRITE_S (1 s here): the writes behind it go on. An
    export, which waits on its client inside its transaction, lifts the bound."""
    monkeypatch.setattr(pool_module, "IDLE_IN_WRITE_S", 1)
    async with Database.open(database_url, pool_size=3) as db:
        await db.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
        frozen = await db.pool.acquire()
        pid = await frozen.fetchval("SELECT pg_backend_pid()")
        stopped = frozen.transaction()
        await stopped.start()
        await frozen.fetchval("SELECT pulse_reserve_event_ids('t1', 1)")  # holds the row
        # ... and sends nothing more: the next write of t1 waits for the row.
        async with db.connection() as next_write, asyncio.timeout(10):
            # The stopped write was ended and rolled back: its id is taken again.
            assert await next_write.fetchval("SELECT pulse_reserve_event_ids('t1', 1)") == 0
            assert not await next_write.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid
            )
        # Closed under it: asyncpg has already given it back to the pool, and says so
        # in one of two ways, by how far its own cleanup got.
        with contextlib.suppress(asyncpg.InterfaceError, asyncpg.InternalClientError):
            await db.pool.release(frozen)
        async with db.connection() as conn, reads._snapshot(conn):
            await asyncio.sleep(2)
            assert await conn.fetchval("SELECT 1") == 1


async def test_a_reconnect_that_times_out_says_it_was_the_connection() -> None:
    """Review R2: a connection the pool makes while serving (here, its first) to a
    server that takes it and never answers timed out with asyncpg's wordless
    TimeoutError, which the translation worded "no answer within the statement's
    timeout". Now it says it was the connection, to which database (never the
    password), and within PULSE_DB_CONNECT_TIMEOUT_S."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        dsn = f"postgresql://pulse:s3cret@127.0.0.1:{port}/pulse_db"
        pool = await create_pool(dsn, min_size=0, connect_timeout=1)
        try:
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable) as unavailable:
                await Database(pool, dsn).fetchval("SELECT 1")
            took = time.monotonic() - started
        finally:
            pool.terminate()
    assert str(unavailable.value) == f"no connection to 127.0.0.1:{port}/pulse_db within 1 s"
    assert 1 <= took < 3, took
