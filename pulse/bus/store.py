"""Reads of the event table: the truth that notifications only hint at."""

from __future__ import annotations

from collections.abc import Collection

from pulse.bus.events import TelemetryEvent
from pulse.db.database import Database
from pulse.db.queries import load_queries
from pulse.db.shared import SharedReads

Q = load_queries(__package__)
MAX_ID = 2**63 - 1


class EventStore:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._newest: SharedReads[str, int] = SharedReads(self._read_newest)

    async def newest_id(self, tenant_id: str) -> int:
        """The tenant's newest committed id, read after this call. Callers that come
        together share reads: after a deploy every stream of a tenant asks at once."""
        return await self._newest.fresh(tenant_id)

    async def _read_newest(self, tenant_id: str) -> int:
        return int(await self._db.fetchval(Q["newest_event_id"], tenant_id))

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
