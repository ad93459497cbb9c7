from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import NoReturn
from urllib.parse import urlsplit

import asyncpg
import pytest

from pulse.db.migrate import Migration, MigrationError, discover, migrate
from pulse.db.pool import connect, describe
from tests.support import dsn_for, insert_readings


@pytest.fixture
async def empty_db(pg_admin_dsn: str):  # type: ignore[no-untyped-def]
    name = f"pulse_empty_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield dsn_for(pg_admin_dsn, name)
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


async def test_fresh_apply_then_noop(empty_db: str) -> None:
    conn = await connect(empty_db)
    try:
        applied = await migrate(conn)
        assert applied == [m.name for m in discover()]
        assert await conn.fetchval("SELECT count(*) FROM pulse_migrations") == len(applied)
        assert await conn.fetchval("SELECT to_regclass('telemetry') IS NOT NULL")
        assert await migrate(conn) == []
    finally:
        await conn.close()


async def test_edited_applied_migration_is_an_error(empty_db: str) -> None:
    conn = await connect(empty_db)
    try:
        await migrate(conn)
        first = discover()[0]
        edited = [Migration(first.version, first.name, first.sql + "\n-- edited\n")]
        with pytest.raises(MigrationError, match="edited after it was applied"):
            await migrate(conn, edited)
    finally:
        await conn.close()


async def test_concurrent_cli_runs_apply_once(empty_db: str) -> None:
    async def run() -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pulse",
            "migrate",
            env={"DATABASE_URL": empty_db, "PATH": "/usr/bin:/bin"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out

    results = await asyncio.gather(run(), run(), run())
    assert all(code == 0 for code, _ in results), results
    outputs = [out.decode() for _, out in results]
    # Each says which database: the one DATABASE_URL meant?
    where = describe(empty_db)
    assert sum(f"applied to {where}: 0001_" in out for out in outputs) == 1, outputs
    assert sum(f"{where} is up to date" in out.splitlines() for out in outputs) == 2, outputs
    conn = await connect(empty_db)
    try:
        rows = await conn.fetch("SELECT version FROM pulse_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [m.version for m in discover()]
    finally:
        await conn.close()


async def test_a_migration_behind_a_long_read_gives_up_and_writes_go_on(empty_db: str) -> None:
    """An export holds its tables for as long as it streams (up to an hour): a migration
    waiting for them held every write behind itself. It now waits hold_s at most holding
    writes, rolls back (writes go on), waits for the read holding nothing, and at last
    fails saying who holds the lock, changing nothing."""
    conn, reader, writer = [await connect(empty_db) for _ in range(3)]
    try:
        await migrate(conn)
        probe = Migration(9999, "9999_probe.sql", "ALTER TABLE telemetry ADD COLUMN probe int;")
        reading = reader.transaction()
        await reading.start()
        await reader.fetch("SELECT * FROM telemetry LIMIT 1")  # as an export holds it
        trying = asyncio.create_task(migrate(conn, [probe], dsn=empty_db, hold_s=0.2, wait_s=2.0))
        # A write goes through while the migration tries.
        await asyncio.wait_for(insert_readings(writer, "t1", [("d1", {"v": 1.0})]), 30)
        with pytest.raises(MigrationError, match=r"9999_probe\.sql did not get .* in 2 s") as err:
            await asyncio.wait_for(trying, 30)
        assert f"pid {reader.get_server_pid()} (" in str(err.value)  # who holds it
        assert not await conn.fetchval("SELECT count(*) FROM pulse_migrations WHERE version = 9999")
        await reading.rollback()
        assert await migrate(conn, [probe], dsn=empty_db, hold_s=0.2) == [probe.name]
    finally:
        for c in (conn, reader, writer):
            await c.close()


@pytest.mark.timeout(120)
async def test_writes_go_on_while_a_migration_waits_for_another_tables_lock(
    empty_db: str,
) -> None:
    """The operations audit, finding 4: a transaction holds a row of `alerts`, and
    `pulse migrate` must apply 0019 (an index on `alerts`). It waited 5 s for that lock
    holding `tenants`, five times: every write (which locks its tenant's row first)
    stalled up to 11 s for about 30 s. Now, holding writes, it waits at most
    HOLD_WRITES_S for the lock, then waits for that transaction holding nothing, and
    applies the migration as soon as it ends. Measured through `pulse migrate` as the
    release runs it, with writes that reserve their ids on the tenant's row as ingest
    does (tests.support.insert_readings)."""
    conn, blocker, writer = [await connect(empty_db) for _ in range(3)]
    proc = None
    try:
        await migrate(conn, [m for m in discover() if m.version < 19])
        await insert_readings(writer, "t1", [("d1", {"v": 1.0})])
        alert_id = await conn.fetchval(
            """INSERT INTO alerts (tenant_id, device_id, alert_type, severity, summary)
               VALUES ('t1', 'd1', 'NO_HEARTBEAT', 3, 'silent') RETURNING alert_id"""
        )
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("UPDATE alerts SET summary = summary WHERE alert_id = $1", alert_id)

        env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DATABASE"))}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pulse",
            "migrate",
            env=env | {"DATABASE_URL": empty_db},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        said: list[str] = []
        waited = asyncio.Event()

        async def read_log() -> None:
            assert proc is not None and proc.stderr is not None
            async for line in proc.stderr:
                said.append(line.decode().rstrip())
                if "0019_closed_alerts_index.sql waited" in said[-1]:
                    waited.set()

        reading_log = asyncio.create_task(read_log())
        latencies: list[float] = []

        async def write_until(done: Callable[[], bool]) -> None:
            while not done():
                started = time.monotonic()
                await asyncio.wait_for(insert_readings(writer, "t1", [("d1", {"v": 2.0})]), 30)
                latencies.append(time.monotonic() - started)

        # Writes go on from before the migration waits until it has waited a while.
        give_up = time.monotonic() + 30
        await write_until(
            lambda: waited.is_set() or proc.returncode is not None or time.monotonic() > give_up
        )
        assert waited.is_set(), said
        until = time.monotonic() + 3.0
        await write_until(lambda: time.monotonic() >= until)
        assert proc.returncode is None, said  # still waiting for the transaction
        await holding.rollback()
        ended = time.monotonic()
        assert proc.stdout is not None
        out = await asyncio.wait_for(proc.stdout.read(), 30)
        await asyncio.wait_for(asyncio.gather(reading_log, proc.wait()), 30)
        assert proc.returncode == 0, said
        assert "applied to " in out.decode() and ": 0019_closed_alerts_index.sql" in out.decode()
        # Applied within moments of the transaction's end, not at a next try seconds later
        # (the process's start and exit included).
        assert time.monotonic() - ended < 5.0, said
        assert len(latencies) > 20
        assert max(latencies) < 2.0, (sorted(latencies)[-5:], said)
        # The log says who held the lock.
        assert f"pid {blocker.get_server_pid()} (" in "\n".join(said), said
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        for c in (conn, blocker, writer):
            await c.close()


# A migration that runs until it is stopped, for the tests of a runner that dies or
# loses its connection mid-way (it never reaches pulse_migrations).
SLOW = Migration(1, "0001_slow.sql", "SELECT pg_sleep(60)")


async def _backend_of(admin: asyncpg.Connection, dsn: str, timeout: float = 20) -> int:
    """The pid of the backend of ``dsn``'s database running SLOW, once it runs it."""
    database = urlsplit(dsn).path.lstrip("/")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query LIKE '%pg_sleep(60)%'"
            " AND state = 'active'",
            database,
        )
        if pid is not None:
            return int(pid)
        await asyncio.sleep(0.05)
    raise AssertionError("the slow migration never ran")


async def test_a_runner_killed_mid_migration_stops_its_statement_within_seconds(
    empty_db: str, pg_admin_dsn: str
) -> None:
    """From the upgrade audit: `pulse migrate` killed (-9) 2 s into a long migration left
    its backend running the statement, and holding its lock on `tenants` (every write
    waits for it), for 15.5 s more. The migration's connection has PostgreSQL check
    that its client is still there, every second (client_connection_check_interval,
    PostgreSQL 14 and later): the server ends the backend within about a second."""
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        if admin.get_server_version().major < 14:
            pytest.skip("client_connection_check_interval is PostgreSQL 14's")
        script = (
            "import asyncio, sys\n"
            "from pulse.db.migrate import migrate\n"
            "from pulse.db.pool import connect\n"
            "from tests.db.test_migrate import SLOW\n"
            "async def main():\n"
            "    conn = await connect(sys.argv[1])\n"
            "    await migrate(conn, [SLOW], dsn=sys.argv[1])\n"
            "asyncio.run(main())\n"
        )
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", script, empty_db)
        try:
            pid = await _backend_of(admin, empty_db)
        finally:
            proc.kill()
            await proc.wait()
        killed = time.monotonic()
        while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            assert time.monotonic() - killed < 5, "the backend outlived its runner by 5 s"
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def test_a_migration_whose_connection_is_lost_says_so_naming_the_database(
    empty_db: str, pg_admin_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the upgrade audit: the backend of `pulse migrate` terminated mid-migration,
    it said `pulse migrate: cannot use the database cannot call Connection.execute():
    connection has been released back to the pool`: naming no database, and hiding the
    cause (the advisory unlock, on the lost connection, raised over it)."""
    from pulse import cli
    from pulse.config import Settings
    from pulse.db import migrate as migrate_module

    class Failed(Exception):
        pass

    def fail(message: str) -> NoReturn:  # sys.exit in a task would stop the event loop
        raise Failed(message)

    monkeypatch.setattr(migrate_module, "discover", lambda: [SLOW])
    monkeypatch.setattr(cli, "fail", fail)
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        running = asyncio.create_task(cli.run_migrations(Settings(database_url=empty_db)))
        pid = await _backend_of(admin, empty_db)
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        with pytest.raises(Failed) as stopped:
            await asyncio.wait_for(running, 20)
    finally:
        await admin.close()
    said = str(stopped.value)
    assert said.startswith(f"pulse migrate: cannot use the database {describe(empty_db)}: "), said
    assert "terminating connection due to administrator command" in said, said
    assert "released back to the pool" not in said, said
    assert "run `pulse migrate` again" in said, said
