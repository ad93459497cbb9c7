"""Standing by for what one process of the cluster does at a time.

The process that does it (the status sweeper, the rollups, the NATS relay) holds a
session advisory lock on a connection of its own: closing that connection, or its
death, releases the lock. The others stand by holding no connection of their own:
they ask on a pooled connection whether the lock is free, and only then open their
own connection to take it (if another process took it first, they stand by again).
So a cluster of N processes holds one connection per such job, not N.
"""

from __future__ import annotations

from pulse.db.database import Database
from pulse.db.queries import load_queries

Q = load_queries(__package__)


async def lock_is_free(db: Database, key: int, *, timeout: float | None = None) -> bool:
    """Whether no session holds the advisory lock ``key`` now (a pooled connection asks,
    and keeps nothing of it)."""
    return bool(await db.fetchval(Q["lock_is_free"], key, timeout=timeout))
