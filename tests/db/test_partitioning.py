"""Migration 0007: an existing telemetry table becomes a partition, nothing lost; the
resume path still reads one tenant's ids in order from an index."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from pulse.db.database import partition_missing
from pulse.db.errors import DatabaseUnavailable
from pulse.db.migrate import discover, migrate
from pulse.db.pool import connect
from pulse.db.queries import load_queries
from pulse.db.retention import utc_today
from tests.support import dsn_for, insert_readings, seam, until

BUS = load_queries("pulse.bus")


def before_0007() -> list:  # type: ignore[type-arg]
    return [m for m in discover() if m.version < 7]


async def test_existing_rows_become_a_partition(conn: asyncpg.Connection) -> None:
    await migrate(conn, before_0007())
    await insert_readings(conn, "t1", [(f"d{i % 3}", {"v": i}) for i in range(200)])
    await insert_readings(conn, "t2", [("d1", {"v": i}) for i in range(50)])
    # Rows received weeks ago too: they stay until their partition is dropped.
    await conn.execute(
        "UPDATE telemetry SET received_at = now() - interval '20 days' WHERE id <= 10"
    )
    before = await conn.fetch("SELECT * FROM telemetry ORDER BY tenant_id, id")

    await migrate(conn)

    after = await conn.fetch("SELECT * FROM telemetry ORDER BY tenant_id, id")
    assert [dict(r) for r in after] == [dict(r) for r in before]
    today = utc_today()
    names = [
        r["relname"]
        for r in await conn.fetch(
            """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'telemetry'::regclass ORDER BY c.relname"""
        )
    ]
    assert names == [f"telemetry_p{today + timedelta(days=d):%Y%m%d}" for d in (1, 2, 3)] + [
        f"telemetry_upto_{today:%Y%m%d}"
    ]
    assert await conn.fetchval(f"SELECT count(*) FROM telemetry_upto_{today:%Y%m%d}") == 250
    # New rows go on with the same ids, and still notify.
    notes: list[str] = []
    await conn.add_listener(
        await conn.fetchval(BUS["channel_for_tenant"], "t1"),
        lambda _c, _p, _ch, payload: notes.append(payload),
    )
    assert await insert_readings(conn, "t1", [("d1", {"v": 1})]) == [201]
    rows = await conn.fetch(BUS["events_after"], "t1", 195, 1000, None, 100)
    assert [r["id"] for r in rows] == [196, 197, 198, 199, 200, 201]
    tomorrow = datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(days=1, hours=1)
    await conn.execute(
        "UPDATE telemetry SET received_at = $1 WHERE id = 201 AND tenant_id = 't1'", tomorrow
    )
    assert (
        await conn.fetchval(f"SELECT id FROM telemetry_p{today + timedelta(days=1):%Y%m%d}") == 201
    )
    await conn.execute("SELECT 1")  # delivers pending notifications
    assert json.loads(notes[0]) == {"kind": "telemetry", "tenant": "t1", "first": 201, "last": 201}


async def test_a_new_database_has_only_daily_partitions(conn: asyncpg.Connection) -> None:
    await migrate(conn)
    assert await conn.fetchval("SELECT to_regclass('telemetry_before_0007')") is None
    count = await conn.fetchval(
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'telemetry'::regclass"
    )
    assert count == 4


async def test_resume_reads_by_index_in_id_order(conn: asyncpg.Connection) -> None:
    await migrate(conn)
    await conn.execute(
        "SELECT pulse_create_telemetry_partitions($1, $2)",
        utc_today() - timedelta(days=6),
        utc_today(),
    )
    await insert_readings(conn, "t1", [("d1", {"v": i}) for i in range(2000)])
    await conn.execute("ANALYZE telemetry")
    plan = "\n".join(
        r[0]
        for r in await conn.fetch(
            "EXPLAIN "
            + BUS["events_after"]
            .replace("$1", "'t1'")
            .replace("$2", "100")
            .replace("$3", "5000")
            .replace("$4::text[]", "NULL::text[]")
            .replace("$5", "1000")
        )
    )
    # One ordered index scan per partition, merged: no sort, no sequential scan.
    assert "Merge Append" in plan, plan
    assert "Seq Scan" not in plan and "Sort" not in plan.replace("Sort Key", ""), plan
    assert "telemetry_p" in plan and "_pkey" in plan, plan


async def test_live_writes_and_the_migration_both_go_through(
    conn: asyncpg.Connection, pg_admin_dsn: str
) -> None:
    """Writes committing while 0007 runs (an upgrade under traffic): each write reserves
    on `tenants` then inserts into `telemetry`; 0007 renames `telemetry` then references
    `tenants`. Neither side may die of a deadlock: the writes wait, then go on."""
    await migrate(conn, before_0007())
    await insert_readings(conn, "t0", [(f"d{i % 5}", {"v": i}) for i in range(20_000)])
    dsn = dsn_for(pg_admin_dsn, await conn.fetchval("SELECT current_database()"))
    stop = asyncio.Event()
    counts: dict[str, int] = {}

    async def write(tenant: str) -> None:
        writer = await connect(dsn)
        try:
            counts[tenant] = 0
            while not stop.is_set():
                await insert_readings(writer, tenant, [("d1", {"v": 1.0})])
                counts[tenant] += 1
        finally:
            await writer.close()

    tasks = [asyncio.create_task(write(f"w{i}")) for i in range(3)]
    try:
        await until(lambda: len(counts) == 3 and min(counts.values()) >= 5, timeout=60)
        assert await migrate(conn) == [m.name for m in discover() if m.version >= 7]
        before = dict(counts)
        await until(lambda: all(counts[t] > before[t] for t in counts), timeout=60)
    finally:
        stop.set()
        await asyncio.gather(*tasks)  # a writer that failed raises here
    for tenant, n in counts.items():
        ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM telemetry WHERE tenant_id = $1 ORDER BY id", tenant
        )]  # fmt: skip
        assert ids == list(range(1, n + 1))


async def test_a_missing_partition_is_unavailable_in_one_line(pool: asyncpg.Pool) -> None:
    """From the operations audit: the driver's text puts the server's DETAIL after a
    newline, so the warning of a missing partition was two lines, its second ("DETAIL:
    Partition key of the failing row ...") with no time or level."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    with pytest.raises(DatabaseUnavailable) as raised:
        await seam(pool).execute(
            """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics,
                                      received_at)
               VALUES ('t1', 1, 'd1', now(), '{}', now() + interval '10 years')"""
        )
    said = str(raised.value)
    assert "\n" not in said, said
    assert said.startswith('no partition of relation "telemetry" found for row DETAIL:'), said
    assert said.endswith("; it is being made again"), said
    assert partition_missing()
