"""Retention: telemetry older than the configured window is deleted in small batches.

Batched deletes rather than dropping time partitions: partitions would change
the table every query reads and the id-ordered primary key the resume path
relies on, for a cost (a few short transactions a minute) that the hot path
does not notice. One process of the cluster works at a time, per batch.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.queries import load_queries

log = logging.getLogger(__name__)
Q = load_queries(__package__)

RETENTION_LOCK_KEY = 0x70756C73_65_7274  # "pulse" "rt"
BATCH = 5000
PAUSE_BETWEEN_BATCHES_S = 0.05


async def trim_once(db: Database, cutoff: datetime, *, batch: int = BATCH) -> int:
    """Delete rows received before ``cutoff``, batch by batch; return how many.

    Returns 0 at once when another process holds this turn.
    """
    deleted = 0
    while True:
        async with db.transaction() as conn:
            if not await conn.fetchval(Q["try_retention_turn"], RETENTION_LOCK_KEY):
                return deleted
            status = await conn.execute(Q["trim_telemetry"], cutoff, batch)
        count = int(status.split()[-1])
        deleted += count
        if count < batch:
            return deleted
        await asyncio.sleep(PAUSE_BETWEEN_BATCHES_S)


async def run_retention(db: Database, retention_hours: float, interval_s: float) -> None:
    """Trim forever, every ``interval_s``; database outages are waited out."""
    while True:
        cutoff = datetime.now(UTC) - timedelta(hours=retention_hours)
        try:
            deleted = await trim_once(db, cutoff)
            if deleted:
                log.info("retention: deleted %d telemetry rows older than %s", deleted, cutoff)
        except DatabaseUnavailable as exc:
            log.warning("retention pass failed: %s", exc)
        await asyncio.sleep(interval_s)
