from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import asyncpg
import pytest

from pulse.db.migrate import Migration, MigrationError, discover, migrate
from pulse.db.pool import connect
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
    assert sum("applied: " in out for out in outputs) == 1, outputs
    conn = await connect(empty_db)
    try:
        rows = await conn.fetch("SELECT version FROM pulse_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [m.version for m in discover()]
    finally:
        await conn.close()


async def test_a_migration_behind_a_long_read_gives_up_and_writes_go_on(empty_db: str) -> None:
    """An export holds its tables for as long as it streams (up to an hour): a migration
    waiting for them held every write behind itself. It now waits lock_timeout_s, rolls
    back (writes go on), tries again, and at last fails saying why, changing nothing."""
    conn, reader, writer = [await connect(empty_db) for _ in range(3)]
    try:
        await migrate(conn)
        probe = Migration(9999, "9999_probe.sql", "ALTER TABLE telemetry ADD COLUMN probe int;")
        reading = reader.transaction()
        await reading.start()
        await reader.fetch("SELECT * FROM telemetry LIMIT 1")  # as an export holds it
        trying = asyncio.create_task(migrate(conn, [probe], lock_timeout_s=0.2, attempts=3))
        # A write goes through while the migration tries (between its attempts at worst).
        await asyncio.wait_for(insert_readings(writer, "t1", [("d1", {"v": 1.0})]), 30)
        with pytest.raises(MigrationError, match=r"9999_probe\.sql did not get .* 3 tries"):
            await asyncio.wait_for(trying, 30)
        assert not await conn.fetchval("SELECT count(*) FROM pulse_migrations WHERE version = 9999")
        await reading.rollback()
        assert await migrate(conn, [probe], lock_timeout_s=0.2, attempts=3) == [probe.name]
    finally:
        for c in (conn, reader, writer):
            await c.close()
