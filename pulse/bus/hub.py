"""Fans each tenant's events out to the subscribers of this process.

``async with hub.subscribe(...)`` is the one way to get events. The first
subscriber of a tenant makes the listener LISTEN to its channel; the last one
to leave makes it UNLISTEN. A notification only says "look": each tenant's
fetcher then reads every row after the last one it delivered, so a lost or
coalesced notification costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

from pulse.bus.events import TelemetryEvent
from pulse.bus.listener import Listener
from pulse.bus.store import EventStore
from pulse.bus.subscription import Filters, Subscription
from pulse.db.errors import DatabaseUnavailable
from pulse.ops.metrics import Metrics

log = logging.getLogger(__name__)

FETCH_LIMIT = 2000
# A lagging subscriber's stream gets this long to say so and close by itself
# before its task is cancelled (it may be stuck writing to a client that
# stopped reading).
LAGGING_GRACE_S = 5.0


class Topic:
    """One tenant's subscribers and the fetcher that feeds them."""

    def __init__(self, hub: Hub, tenant_id: str) -> None:
        self.hub = hub
        self.tenant_id = tenant_id
        self.subscribers: set[Subscription] = set()
        self.channel = ""
        self.delivered = 0  # newest id handed to the subscribers
        self.dirty = asyncio.Event()
        self.closed = False
        # The tenant's previous topic may still be closing: its UNLISTEN must
        # not land after this one's LISTEN.
        self._previous = hub._closing.get(tenant_id)
        self.opened: asyncio.Task[None] = asyncio.create_task(self._open())
        self.fetcher: asyncio.Task[None] | None = None

    async def _open(self) -> None:
        store, listener = self.hub.store, self.hub.listener
        if self._previous is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._previous)
            self._previous = None
        self.channel = await store.channel_for(self.tenant_id)
        # LISTEN before reading the newest id: whatever commits later is notified.
        await listener.listen(self.channel)
        self.delivered = await store.newest_id(self.tenant_id)
        if self.closed:
            # Closed while opening, and the cancellation was lost on the way
            # (Python 3.11's wait_for, inside asyncpg too, can swallow one).
            return
        self.fetcher = asyncio.create_task(
            self._fetch_forever(), name=f"pulse:fetch:{self.tenant_id}"
        )

    async def _fetch_forever(self) -> None:
        backoff = 0.1
        while True:
            await self.dirty.wait()
            self.dirty.clear()
            try:
                while True:
                    with self.hub.metrics.fetch_latency.time():
                        events = await self.hub.store.events_after(
                            self.tenant_id, self.delivered, limit=FETCH_LIMIT
                        )
                    if events:
                        self.delivered = events[-1].id
                        self.hub.publish(self, events)
                    if len(events) < FETCH_LIMIT:
                        break
                backoff = 0.1
            except DatabaseUnavailable as exc:
                log.warning("fetch for a tenant failed (%s); retrying in %.1f s", exc, backoff)
                self.dirty.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:
                log.exception("fetch for a tenant failed; retrying")
                self.dirty.set()
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        self.closed = True
        # The opening first: once it has ended, no fetcher can be made any more.
        await _cancel(self.opened)
        if self.fetcher is not None:
            await _cancel(self.fetcher)
        if self.channel:
            await self.hub.listener.unlisten(self.channel)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


class Hub:
    def __init__(
        self,
        store: EventStore,
        listener_dsn: str,
        metrics: Metrics,
        *,
        queue_size: int,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.queue_size = queue_size
        self.listener = Listener(
            listener_dsn,
            on_notification=self._on_notification,
            on_reconnect=self._on_reconnect,
            on_reconnected=metrics.listener_reconnects.inc,
            backoff_max_s=backoff_max_s,
        )
        self._topics: dict[str, Topic] = {}
        self._closing: dict[str, asyncio.Task[None]] = {}  # topics on their way out
        self.draining = False
        # Labelled counters looked up once per kind: .labels() is not free, and
        # publish runs once per subscriber per batch.
        self._delivered = functools.cache(metrics.events_delivered.labels)
        self._delivered_directly = functools.cache(metrics.events_delivered_directly.labels)
        self._dropped = functools.cache(metrics.events_dropped_lagging.labels)

    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        tenant_id: str,
        filters: Filters | None = None,
        *,
        kind: str,
        signals: frozenset[str] = frozenset(),
    ) -> AsyncIterator[Subscription]:
        """Subscribe to a tenant's live events, from the newest delivered id on.

        Raises DatabaseUnavailable when the tenant's channel cannot be listened to.
        """
        if self.draining:
            raise DatabaseUnavailable("the server is shutting down")
        topic = self._topics.get(tenant_id)
        if topic is None:
            topic = self._topics[tenant_id] = Topic(self, tenant_id)
        subscription = Subscription(
            tenant_id, filters or Filters(), kind=kind, limit=self.queue_size, signals=signals
        )
        subscription.owner = asyncio.current_task()
        topic.subscribers.add(subscription)
        try:
            await asyncio.shield(topic.opened)
            subscription.position = max(subscription.position, topic.delivered)
            yield subscription
        finally:
            topic.subscribers.discard(subscription)
            if not topic.subscribers and self._topics.get(tenant_id) is topic:
                del self._topics[tenant_id]
                closing = self._closing[tenant_id] = asyncio.create_task(topic.close())
                closing.add_done_callback(
                    lambda task: (
                        self._closing.pop(tenant_id, None)
                        if self._closing.get(tenant_id) is task
                        else None
                    )
                )
                # Shielded: a cancelled stream must still UNLISTEN.
                await asyncio.shield(closing)

    def publish(self, topic: Topic, events: list[TelemetryEvent]) -> None:
        # Counted per kind and added once: this loop runs once per subscriber.
        delivered: dict[str, int] = {}
        directly: dict[str, int] = {}
        dropped: dict[str, int] = {}
        for subscription in list(topic.subscribers):
            kind = subscription.kind
            if subscription.lagging:
                dropped[kind] = dropped.get(kind, 0) + len(events)
                continue
            queued = subscription.offer(events)
            if queued:
                delivered[kind] = delivered.get(kind, 0) + queued
                if subscription.wrote_directly:
                    directly[kind] = directly.get(kind, 0) + queued
            if subscription.lagging:
                self._on_lagging(subscription)
        for kind, count in delivered.items():
            self._delivered(kind).inc(count)
        for kind, count in directly.items():
            self._delivered_directly(kind).inc(count)
        for kind, count in dropped.items():
            self._dropped(kind).inc(count)

    def _on_lagging(self, subscription: Subscription) -> None:
        self.metrics.lagging_disconnects.labels(subscription.kind).inc()
        topic = self._topics.get(subscription.tenant_id)

        def cancel_if_stuck() -> None:
            owner = subscription.owner
            if owner is not None and topic is not None and subscription in topic.subscribers:
                log.warning("a lagging %s stream did not close; cancelling it", subscription.kind)
                owner.cancel()
            # Whether or not the stream ended, a client that has not read what
            # was written to it by now has stopped reading: its connection would
            # otherwise stay open, holding its buffers, for as long as it likes.
            if subscription.drop_unread is not None:
                subscription.drop_unread()

        asyncio.get_running_loop().call_later(LAGGING_GRACE_S, cancel_if_stuck)

    def _on_notification(self, message: dict[str, Any]) -> None:
        topic = self._topics.get(str(message.get("tenant")))
        if topic is None:
            return
        if message.get("kind") == "telemetry":
            last = message.get("last")
            if not isinstance(last, int) or last > topic.delivered:
                topic.dirty.set()
            return
        signal = message.get("kind")
        if isinstance(signal, str):
            for subscription in list(topic.subscribers):
                subscription.notify(signal)

    def _on_reconnect(self) -> None:
        # Anything may have been committed while we were away: every tenant re-reads.
        for topic in self._topics.values():
            topic.dirty.set()
            for subscription in list(topic.subscribers):
                for signal in subscription.signals:
                    subscription.notify(signal)

    def drain(self) -> None:
        """Shutting down: end every subscription now and refuse new ones."""
        self.draining = True
        for topic in self._topics.values():
            for subscription in list(topic.subscribers):
                subscription.close()

    def subscriber_count(self) -> int:
        return sum(len(t.subscribers) for t in self._topics.values())

    async def close(self) -> None:
        topics, self._topics = list(self._topics.values()), {}
        for topic in topics:
            await topic.close()
