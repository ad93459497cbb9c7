"""Reads of the event table: the truth that notifications only hint at."""

from __future__ import annotations

from collections.abc import Collection

import asyncpg

from pulse.bus.events import TelemetryEvent
from pulse.db.errors import translate_errors
from pulse.db.queries import load_queries

Q = load_queries(__package__)
MAX_ID = 2**63 - 1


class EventStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def channel_for(self, tenant_id: str) -> str:
        with translate_errors():
            return str(await self._pool.fetchval(Q["channel_for_tenant"], tenant_id))

    async def newest_id(self, tenant_id: str) -> int:
        with translate_errors():
            return int(await self._pool.fetchval(Q["newest_event_id"], tenant_id))

    async def earliest_id(self, tenant_id: str) -> int | None:
        with translate_errors():
            value = await self._pool.fetchval(Q["earliest_event_id"], tenant_id)
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
        with translate_errors():
            rows = await self._pool.fetch(Q["events_after"], tenant_id, after, upto, devices, limit)
        return [TelemetryEvent(r[0], r[1], r[2], r[3]) for r in rows]
