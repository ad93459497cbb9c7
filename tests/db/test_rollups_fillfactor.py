"""Migration 0010: the rollups' pages keep room for their rows' next versions, so that
the passes that update an open bucket again and again update it in place ("HOT": no new
index entry, no new page) instead of spreading copies over the table."""

from __future__ import annotations

import asyncpg

from pulse.history.rollups import roll_up_tenant
from tests.support import insert_readings

DEVICES = 200


async def test_open_buckets_are_updated_in_place(pool: asyncpg.Pool) -> None:
    options = await pool.fetchval(
        "SELECT reloptions FROM pg_class WHERE relname = 'telemetry_rollups'"
    )
    assert "fillfactor=70" in options
    readings = [(f"d{i:03d}", {"temp": float(i), "hum": 50.0}) for i in range(DEVICES)]
    async with pool.acquire() as conn:
        newest = (await insert_readings(conn, "t1", readings))[-1]
        await roll_up_tenant(conn, "t1", newest)  # the buckets' rows
        newest = (await insert_readings(conn, "t1", readings))[-1]
        async with conn.transaction():
            # The next pass updates each (device, metric, width) once, or twice where the
            # minute turned over. Counted in this transaction: the room must be there,
            # not made by pruning old versions (which another session's snapshot can
            # prevent).
            await roll_up_tenant(conn, "t1", newest)
            stats = await conn.fetchrow(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
                " WHERE relname = 'telemetry_rollups'"
            )
    assert stats["n_tup_upd"] >= DEVICES * 2  # the hours' rows at least (1,200 in all)
    assert stats["n_tup_hot_upd"] > 0.3 * stats["n_tup_upd"], dict(stats)  # none at 100
