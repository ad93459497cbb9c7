"""An in-memory event source and event table, for unit tests of the hub.

``MemorySource`` implements pulse.bus.source.EventSource in a few lines, which
is also the check that a second source is one module: the hub runs on it
unchanged. ``MemoryStore`` answers the hub's two reads from a list.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Collection

from pulse.bus.events import TelemetryEvent
from pulse.bus.hub import Hub
from pulse.bus.source import Wakeups
from pulse.ops.metrics import Metrics
from tests.support import until


class MemorySource:
    def __init__(self) -> None:
        self.watching: set[str] = set()
        self.calls: list[tuple[str, str]] = []  # ("watch" | "unwatch", tenant), in order
        self.reconnects = 0
        self.last_wakeup_at: float | None = None
        self.connected = False
        self.wakeups: Wakeups | None = None
        # Tests hold these to keep a watch or an unwatch in flight.
        self.watch_gate = asyncio.Event()
        self.unwatch_gate = asyncio.Event()
        self.watch_gate.set()
        self.unwatch_gate.set()

    @property
    def watched(self) -> int:
        return len(self.watching)

    async def watch(self, tenant_id: str) -> None:
        self.calls.append(("watch", tenant_id))
        await self.watch_gate.wait()
        self.watching.add(tenant_id)

    async def unwatch(self, tenant_id: str) -> None:
        self.calls.append(("unwatch", tenant_id))
        await self.unwatch_gate.wait()
        self.watching.discard(tenant_id)

    async def run(self, wakeups: Wakeups) -> None:
        self.wakeups = wakeups
        self.connected = True
        wakeups.resync()
        await asyncio.Event().wait()

    def published(self, tenant_id: str, after: int, events: list[TelemetryEvent]) -> None:
        """What the NATS source hands over for a relay's message: the events themselves."""
        assert self.wakeups is not None, "run() first"
        if tenant_id in self.watching:
            self.wakeups.deliver(tenant_id, after, events)

    def committed(self, tenant_id: str, last_id: int | None) -> None:
        """What LISTEN would say after a commit: a wake-up, only for watched tenants."""
        assert self.wakeups is not None, "run() first"
        if tenant_id in self.watching:
            self.last_wakeup_at = time.monotonic()
            self.wakeups.events_after(tenant_id, last_id)


class MemoryStore:
    def __init__(self) -> None:
        self.events: dict[str, list[TelemetryEvent]] = {}
        self.reads = 0  # events_after calls
        self.read_gate = asyncio.Event()  # tests clear it to hold reads in flight
        self.read_gate.set()

    def rows(self, tenant_id: str, first: int, last: int) -> list[TelemetryEvent]:
        """Stored events first..last, as a relay's message carries them."""
        return [e for e in self.events[tenant_id] if first <= e.id <= last]

    def commit(self, tenant_id: str, device_id: str = "d1", count: int = 1) -> int:
        """Append ``count`` events; the newest id."""
        rows = self.events.setdefault(tenant_id, [])
        for _ in range(count):
            rows.append(
                TelemetryEvent(len(rows) + 1, device_id, "2026-12-04T00:00:00.000Z", '{"v": 1}')
            )
        return len(rows)

    async def newest_id(self, tenant_id: str) -> int:
        return len(self.events.get(tenant_id, []))

    async def earliest_id(self, tenant_id: str) -> int | None:
        return 1 if self.events.get(tenant_id) else None

    async def events_after(
        self,
        tenant_id: str,
        after: int,
        *,
        upto: int = 2**63 - 1,
        device_ids: Collection[str] | None = None,
        limit: int = 1000,
    ) -> list[TelemetryEvent]:
        self.reads += 1
        await self.read_gate.wait()
        rows = [
            e
            for e in self.events.get(tenant_id, [])
            if after < e.id <= upto and (device_ids is None or e.device_id in device_ids)
        ]
        return rows[:limit]


@contextlib.asynccontextmanager
async def running_hub(
    queue_size: int = 100, store: MemoryStore | None = None
) -> AsyncIterator[tuple[Hub, MemorySource, MemoryStore]]:
    """A hub on the in-memory source and table, its source running."""
    source, store = MemorySource(), store or MemoryStore()
    hub = Hub(store, source, Metrics(), queue_size=queue_size)  # type: ignore[arg-type]
    feeding = asyncio.create_task(source.run(hub))
    await until(lambda: source.connected)  # its first resync is behind it
    try:
        yield hub, source, store
    finally:
        await hub.close()
        feeding.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeding
