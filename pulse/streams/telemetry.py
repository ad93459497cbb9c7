"""Replay from the table, then live: the exactly-once core shared by SSE and the WebSocket.

The order of steps is what makes replay and live meet exactly:
1. read the tenant's newest committed id;
2. with a resume position, replay (position, newest] from the table, before
   subscribing, so a long replay cannot fill the live queue behind it;
3. subscribe, then read the newest id again (it covers everything the hub has
   delivered, since the hub only delivers committed rows) and replay up to it;
4. drop from the live queue what the replay already sent, and go live.
Ids are in commit order, so "greater than the last id sent" is a complete and
duplicate-free description of what is still owed.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from pulse.bus.events import TelemetryEvent
from pulse.bus.hub import Hub
from pulse.bus.store import EventStore
from pulse.bus.subscription import Closing, Filters, Lagging, Subscription

REPLAY_PAGE = 2000


@dataclasses.dataclass(frozen=True)
class Started:
    """First item: the tenant's newest committed id when the stream began."""

    newest_id: int


@dataclasses.dataclass(frozen=True)
class Reset:
    """The resume position could not be honoured as asked; ``data`` says why."""

    data: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Idle:
    """Nothing to send for a while; ``position`` is the newest id passed so far."""

    position: int


@dataclasses.dataclass(frozen=True)
class End:
    reason: str  # "lagging" | "token_expired" | "server_restarting"


Item = list[TelemetryEvent] | Started | Reset | Idle | End


class TelemetryStream:
    def __init__(
        self,
        hub: Hub,
        store: EventStore,
        tenant_id: str,
        filters: Filters,
        *,
        kind: str,
        last_event_id: int | None,
        idle_s: float,
        expires_at: float,
    ) -> None:
        self.hub = hub
        self.store = store
        self.tenant_id = tenant_id
        self.filters = filters
        self.kind = kind
        self.last_event_id = last_event_id
        self.idle_s = idle_s
        self.expires_at = expires_at  # time.time() seconds; the WebSocket may extend it
        self.position = 0  # newest id passed, sent or filtered out
        self.subscription: Subscription | None = None
        # Set by a handler whose connection can take writes from the hub's call
        # (Subscription.deliver_now): encode and write live events at once, or
        # say False. ``written_now`` is the newest id written that way.
        self.write_now: Callable[[list[TelemetryEvent]], bool] | None = None
        self.written_now = 0
        self.drop_unread: Callable[[], None] | None = None

    def set_filters(self, filters: Filters) -> None:
        self.filters = filters
        if self.subscription is not None:
            self.subscription.set_filters(filters)

    async def items(self) -> AsyncGenerator[Item, None]:
        newest = await self.store.newest_id(self.tenant_id)
        self.position = newest
        yield Started(newest)
        if self.last_event_id is not None:
            async for item in self._resume(self.last_event_id, newest):
                yield item
        async with self.hub.subscribe(self.tenant_id, self.filters, kind=self.kind) as subscription:
            self.subscription = subscription
            if subscription.filters != self.filters:
                # Changed (by a WebSocket client) while the subscription was opening.
                subscription.set_filters(self.filters)
            head = await self.store.newest_id(self.tenant_id)
            async for batch in self._replay(self.position, head):
                yield batch
            subscription.skip_through(head)
            subscription.drop_unread = self.drop_unread
            if self.write_now is not None:
                subscription.deliver_now = self._deliver_now
            async for item in self._live(subscription):
                yield item

    def _deliver_now(self, events: list[TelemetryEvent]) -> bool:
        # Past the token's expiry the stream's task ends the stream instead.
        if self.write_now is None or time.time() >= self.expires_at:
            return False
        if not self.write_now(events):
            return False
        self.position = max(self.position, events[-1].id)
        self.written_now = events[-1].id
        return True

    async def _resume(self, last_event_id: int, newest: int) -> AsyncIterator[Item]:
        if last_event_id > newest:
            yield Reset({"reason": "unknown_position", "last_event_id": newest})
            return
        cursor = last_event_id
        earliest = await self.store.earliest_id(self.tenant_id)
        if earliest is not None and last_event_id + 1 < earliest:
            yield Reset({"reason": "history_trimmed", "earliest_id": earliest})
            cursor = earliest - 1
        async for batch in self._replay(cursor, newest):
            yield batch

    async def _replay(self, after: int, upto: int) -> AsyncIterator[list[TelemetryEvent]]:
        cursor = after
        while cursor < upto and not self.hub.draining:
            filters = self.filters
            page = await self.store.events_after(
                self.tenant_id, cursor, upto=upto, device_ids=filters.device_ids, limit=REPLAY_PAGE
            )
            if not page:
                break
            cursor = page[-1].id
            batch = page if filters.metrics is None else [e for e in page if filters.accepts(e)]
            if batch:
                yield batch
            if len(page) < REPLAY_PAGE:
                break
        self.position = max(self.position, upto)

    async def _live(self, subscription: Subscription) -> AsyncIterator[Item]:
        while True:
            remaining = self.expires_at - time.time()
            if remaining <= 0:
                yield End("token_expired")
                return
            if not await subscription.wait(min(self.idle_s, remaining)):
                if time.time() < self.expires_at:
                    self.position = max(self.position, subscription.position)
                    yield Idle(self.position)
                continue
            try:
                batch = subscription.take()
            except Lagging:
                yield End("lagging")
                return
            except Closing:
                yield End("server_restarting")
                return
            subscription.take_signals()
            if batch:
                self.position = max(self.position, batch[-1].id)
                yield batch
