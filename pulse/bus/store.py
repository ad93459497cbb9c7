"""Reads of the event table: the truth that notifications only hint at."""

from __future__ import annotations

import asyncio
from collections.abc import Collection

from pulse.bus.events import TelemetryEvent
from pulse.db.database import Database
from pulse.db.errors import DatabaseTimeout
from pulse.db.queries import load_queries
from pulse.db.shared import SharedReads

Q = load_queries(__package__)
MAX_ID = 2**63 - 1
# How long the read of a tenant's newest id may wait (a lock on ``tenants``, a database
# that stopped answering) before the stream opening on it is refused as unavailable
# (a WebSocket closed 1011 database_unavailable, to reconnect and resume): the budget
# a write has to begin (pulse.ingest.writer.WAIT_S). A new WebSocket waited for a 30 s
# lock's end, 26.5 s, for its `connected` message, where ingest gave up after 10 s.
# One deadline per caller, for all of its wait: a pooled connection coming free (each
# may be held by a statement the database does not answer, up to command_timeout,
# 60 s), the statement, and a read in flight that it waits for before its own (the
# review of d13e826 measured over 4 s with 1 s here, the pool held; 2x it otherwise).
NEWEST_WAIT_S = 10.0
_NO_NEWEST = (
    "no newest event id within %g s (no pooled connection came free, or the database "
    "did not answer)"
)


class EventStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._newest: SharedReads[str, int] = SharedReads(self._read_newest)

    async def newest_id(self, tenant_id: str) -> int:
        """The tenant's newest committed id, read after this call. Callers that come
        together share reads: after a deploy every stream of a tenant asks at once."""
        try:
            async with asyncio.timeout(NEWEST_WAIT_S):
                # Shielded inside: a caller given up on leaves the read to the others.
                return await self._newest.fresh(tenant_id)
        except TimeoutError:
            raise DatabaseTimeout(_NO_NEWEST % NEWEST_WAIT_S) from None

    async def _read_newest(self, tenant_id: str) -> int:
        # Bounded itself too, the connection's acquiring with it, so that a read shared
        # by callers who gave up does not wait on: timed out, asyncpg cancels the
        # statement on the server (the seam says that as a DatabaseTimeout).
        try:
            async with asyncio.timeout(NEWEST_WAIT_S):
                value = await self._db.fetchval(
                    Q["newest_event_id"], tenant_id, timeout=NEWEST_WAIT_S
                )
        except TimeoutError:
            raise DatabaseTimeout(_NO_NEWEST % NEWEST_WAIT_S) from None
        return int(value)

    async def earliest_id(self, tenant_id: str) -> int | None:
        value = await self._db.fetchval(Q["earliest_event_id"], tenant_id)
        return None if value is None else int(value)

    async def events_after(
        self,
        tenant_id: str,
        after: int,
        *,
        upto: int = MAX_ID,
        device_ids: Collection[str] | None = None,
        limit: int = 1000,
    ) -> list[TelemetryEvent]:
        devices = None if device_ids is None else list(device_ids)
        rows = await self._db.fetch(Q["events_after"], tenant_id, after, upto, devices, limit)
        return [TelemetryEvent(r[0], r[1], r[2], r[3]) for r in rows]
