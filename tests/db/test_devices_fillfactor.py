"""Migration 0012: the devices' pages keep room for their rows' next versions, so that
marking a device seen (about once a second for a busy fleet) updates its row in place
("HOT": no new index entry, no new page) instead of spreading copies over the table."""

from __future__ import annotations

import asyncpg

from pulse.db.queries import load_queries
from tests.support import provision_device

DEVICES = 200
TOUCHES = 6

Q = load_queries("pulse.ingest")


async def test_marking_devices_seen_updates_them_in_place(pool: asyncpg.Pool) -> None:
    options = await pool.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'devices'")
    assert "fillfactor=70" in options
    devices = [f"d{i:03d}" for i in range(DEVICES)]
    for device_id in devices:
        await provision_device(pool, "t1", device_id)
    async with pool.acquire() as conn:
        for _ in range(TOUCHES):  # precision 0: every device's row is written each time
            await conn.fetch(Q["touch_devices"], ["t1"] * DEVICES, devices, 0.0)
        await conn.execute("SELECT pg_stat_force_next_flush()")
    async with pool.acquire() as conn:  # a new transaction: the counts are flushed
        stats = await conn.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'devices'"
        )
    assert stats["n_tup_upd"] >= TOUCHES * DEVICES
    assert stats["n_tup_hot_upd"] > 0.8 * stats["n_tup_upd"], dict(stats)  # 35% at 100
