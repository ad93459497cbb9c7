"""Migration 0012: the devices' pages keep room for their rows' next versions, so that
marking a device seen (about once a second for a busy fleet) updates its row in place
("HOT": no new index entry, no new page) instead of spreading copies over the table."""

from __future__ import annotations

import asyncpg

from pulse.db.queries import load_queries
from tests.support import provision_device

DEVICES = 200

Q = load_queries("pulse.ingest")


async def test_marking_devices_seen_updates_them_in_place(pool: asyncpg.Pool) -> None:
    options = await pool.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'devices'")
    assert "fillfactor=70" in options
    devices = [f"d{i:03d}" for i in range(DEVICES)]
    for device_id in devices:
        await provision_device(pool, "t1", device_id)
    async with pool.acquire() as conn, conn.transaction():
        # Precision 0: every device's row is written. Counted in this transaction, and
        # in one statement: the room must be there, not made by pruning old versions
        # (which another session's snapshot can prevent).
        await conn.fetch(Q["touch_devices"], ["t1"] * DEVICES, devices, 0.0)
        stats = await conn.fetchrow(
            "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_xact_user_tables"
            " WHERE relname = 'devices'"
        )
    assert stats["n_tup_upd"] == DEVICES
    assert stats["n_tup_hot_upd"] > 0.3 * DEVICES, dict(stats)  # none at fillfactor 100
