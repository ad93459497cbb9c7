"""Seq claims of broker readings are trimmed once no redelivery can meet them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from pulse.db.database import Database
from pulse.mqtt.service import trim_claims


async def test_old_claims_are_trimmed_in_batches(db: Database, pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    await pool.execute(
        """INSERT INTO broker_seqs (tenant_id, device_id, seq, claimed_at)
           SELECT 't1', 'd1', s, $1::timestamptz - make_interval(hours => (s % 2) * 48)
             FROM generate_series(1, 10) s""",
        now,
    )
    assert await trim_claims(db, now - timedelta(hours=25), batch=2) == 5
    left = await pool.fetch("SELECT seq FROM broker_seqs ORDER BY seq")
    assert [r["seq"] for r in left] == [2, 4, 6, 8, 10]
