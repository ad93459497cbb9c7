"""Fans each tenant's events out to the subscribers of this process.

``async with hub.subscribe(...)`` is the one way to get events. The first
subscriber of a tenant makes the event source watch it; the last one to leave
makes it unwatch. A wake-up only says "look": each tenant's topic then reads
every row after the last one it delivered, so a lost or merged wake-up costs
nothing. A source that carries the events themselves (NATS) hands them over
with the id they follow: they are published as they come when that id is the
topic's last delivered one, and otherwise (a lost message, a relay taking
over) the topic reads the gap from the table first. The hub knows its source
only by the small interface of ``pulse.bus.source``, and its subscribers'
connections only by their sinks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from typing import Any

from pulse.bus.events import TelemetryEvent
from pulse.bus.source import EventSource
from pulse.bus.store import EventStore
from pulse.bus.subscription import Filters, Sink, Subscription
from pulse.db.errors import DatabaseUnavailable
from pulse.logs import Throttled
from pulse.ops.metrics import Metrics

log = logging.getLogger(__name__)

FETCH_LIMIT = 2000
# Events handed over (deliver) while the topic reads the table wait for the
# read to end, up to this many; beyond it they are dropped and read instead.
PENDING_LIMIT = 10_000
# A subscriber cut as lagging gets this long to end its stream by itself before
# its sink is told to abort it (it may be stuck writing to a client that
# stopped reading).
LAGGING_GRACE_S = 5.0
# A read of the table that failed is tried again after this long, doubling up to the
# most (whatever the error: an outage, or a permission revoked).
READ_BACKOFF_MIN_S = 0.1
READ_BACKOFF_MAX_S = 5.0


class Topic:
    """One tenant's subscribers, and the task that watches and fetches for them.

    One task from start to end: it waits for the tenant's previous topic to be
    gone, watches the tenant, reads the newest id (``opened``), then fetches on
    every wake-up. ``close`` cancels it and unwatches; ``closed`` also ends it
    should a cancellation be lost on the way (Python 3.11's wait_for, used
    inside asyncpg too, can swallow one), so no fetch outlives its topic.

    Events handed over by the source (``deliver``) are published from the
    source's own call when they follow ``delivered``; while the topic opens or
    reads the table they wait in ``pending`` and are taken when the read ends,
    so the table and the messages never publish out of order.
    """

    def __init__(self, hub: Hub, tenant_id: str, previous: asyncio.Task[None] | None) -> None:
        self.hub = hub
        self.tenant_id = tenant_id
        self.subscribers: set[Subscription] = set()
        self.delivered = 0  # newest id handed to the subscribers
        self.dirty = asyncio.Event()
        self.closed = False
        self.watching = False
        self.reading = True  # opening, or reading the table: deliveries wait
        self.pending: list[tuple[int, list[TelemetryEvent]]] = []
        self.pending_events = 0
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.opened.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._task = loop.create_task(self._run(previous), name=f"pulse:topic:{tenant_id}")

    async def _run(self, previous: asyncio.Task[None] | None) -> None:
        try:
            if previous is not None:
                # Its unwatch must not land after this topic's watch.
                with contextlib.suppress(Exception):
                    await asyncio.shield(previous)
            # Watch before reading the newest id: whatever commits later wakes us.
            self.watching = True
            await self.hub.source.watch(self.tenant_id)
            self.delivered = await self.hub.store.newest_id(self.tenant_id)
            if self.closed:  # while opening, and the cancellation was lost on the way
                raise DatabaseUnavailable("the tenant's topic closed while it opened")
        except BaseException as exc:
            if not self.opened.done():
                self.opened.set_exception(
                    exc if isinstance(exc, Exception) else DatabaseUnavailable("topic closed")
                )
            raise
        self.opened.set_result(None)
        await self._fetch_forever()

    async def _fetch_forever(self) -> None:
        backoff = READ_BACKOFF_MIN_S
        self._take_pending()
        while not self.closed:
            await self.dirty.wait()
            self.dirty.clear()
            self.reading = True
            try:
                while not self.closed:
                    with self.hub.metrics.fetch_latency.time():
                        events = await self.hub.store.events_after(
                            self.tenant_id, self.delivered, limit=FETCH_LIMIT
                        )
                    if events and not self.closed:
                        self.delivered = events[-1].id
                        self.hub.publish(self, events)
                    if len(events) < FETCH_LIMIT:
                        break
                backoff = READ_BACKOFF_MIN_S
                self.hub.read_succeeded(self)
            except DatabaseUnavailable as exc:
                self.hub.read_failed(self, exc)
                self.hub.fetch_failures.warning(
                    "reading a tenant's new events failed (%s); retrying", exc
                )
                self.dirty.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, READ_BACKOFF_MAX_S)
            except Exception as exc:
                # Lasting, most likely (SELECT revoked on telemetry): its traceback
                # once, then a line per 10 s for every tenant together; before, 28
                # lines a second per tenant for as long as it lasted.
                self.hub.read_failed(self, exc)
                self.hub.read_errors.error(
                    "reading a tenant's new events failed; its streams get nothing until "
                    "it succeeds, retrying"
                )
                self.dirty.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, READ_BACKOFF_MAX_S)
            finally:
                self._take_pending()

    def deliver(self, after: int, events: list[TelemetryEvent]) -> None:
        """The source's events of this tenant: every one in (``after``, last]."""
        if self.closed:
            return
        if self.reading:
            if self.pending_events + len(events) > PENDING_LIMIT:
                # The read in progress, and the one this asks for, cover them.
                self.pending, self.pending_events = [], 0
                self.dirty.set()
                return
            self.pending.append((after, events))
            self.pending_events += len(events)
            return
        self._apply(after, events)

    def _take_pending(self) -> None:
        self.reading = False
        pending, self.pending, self.pending_events = self.pending, [], 0
        for after, events in pending:
            self._apply(after, events)

    def _apply(self, after: int, events: list[TelemetryEvent]) -> None:
        last = events[-1].id
        if last <= self.delivered or self.closed:
            return  # delivered already (read from the table, or a message repeated)
        if after > self.delivered:
            # Something between was lost on the way (a message, a relay taking
            # over): the table fills the gap, and these events come with it.
            if not self.dirty.is_set():
                self.hub.metrics.bus_gaps_filled.inc()
            self.dirty.set()
            return
        if events[0].id <= self.delivered:
            events = [e for e in events if e.id > self.delivered]
        self.delivered = last
        self.hub.publish(self, events)

    async def close(self) -> None:
        self.closed = True
        self.dirty.set()
        self._task.cancel()
        # Waited for, not awaited: a close that is itself cancelled (the runtime's stop
        # out of time) must not take that for its task's end, and go on.
        await asyncio.wait({self._task})
        if not self._task.cancelled():
            self._task.exception()  # retrieved: a failure of its own is not the close's
        self.hub.read_succeeded(self)  # nothing left to read for it
        if self.watching:
            try:
                await self.hub.source.unwatch(self.tenant_id)
            except DatabaseUnavailable as exc:
                log.warning("unwatching a tenant failed: %s", exc)


class Hub:
    def __init__(
        self, store: EventStore, source: EventSource, metrics: Metrics, *, queue_size: int
    ) -> None:
        self.store = store
        self.source = source
        self.metrics = metrics
        self.queue_size = queue_size
        self._topics: dict[str, Topic] = {}
        self._closing: dict[str, asyncio.Task[None]] = {}  # topics on their way out
        self.draining = False
        self._drained = asyncio.Event()  # set with draining, by drain
        # One line per 10 s for every tenant's reads together, not one per tenant and try.
        self.fetch_failures = Throttled(log)
        self.read_errors = Throttled(log)
        # The topics whose last read failed, and the error: while any, the streams of
        # their tenants get nothing, and the status endpoint says "degraded".
        self.failing_reads: dict[Topic, str] = {}
        # Labelled counters looked up once per kind: .labels() is not free, and
        # publish runs once per subscriber per batch.
        self._delivered = functools.cache(metrics.events_delivered.labels)
        self._delivered_directly = functools.cache(metrics.events_delivered_directly.labels)
        self._dropped = functools.cache(metrics.events_dropped_lagging.labels)

    def read_failed(self, topic: Topic, exc: Exception) -> None:
        unavailable = isinstance(exc, DatabaseUnavailable)
        self.metrics.bus_read_failures.labels(
            "database_unavailable" if unavailable else "error"
        ).inc()
        self.failing_reads[topic] = "database unavailable" if unavailable else type(exc).__name__

    def read_succeeded(self, topic: Topic) -> None:
        self.failing_reads.pop(topic, None)

    def read_problem(self) -> str | None:
        """Why streams get nothing, when reads of the table fail (no tenant named)."""
        if not self.failing_reads:
            return None
        errors = sorted(set(self.failing_reads.values()))
        count = len(self.failing_reads)
        return (
            f"reading new events from the table fails for {count} "
            f"tenant{'s' if count > 1 else ''} ({', '.join(errors)}): their streams get "
            "nothing; see the log"
        )

    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        tenant_id: str,
        filters: Filters | None = None,
        *,
        kind: str,
        signals: frozenset[str] = frozenset(),
        sink: Sink | None = None,
    ) -> AsyncIterator[Subscription]:
        """Subscribe to a tenant's live events, from the newest delivered id on.

        Raises DatabaseUnavailable when the tenant cannot be watched, or the
        server is shutting down.
        """
        if self.draining:
            raise DatabaseUnavailable("the server is shutting down")
        topic = self._topics.get(tenant_id)
        if topic is None:
            topic = Topic(self, tenant_id, self._closing.get(tenant_id))
            self._topics[tenant_id] = topic
        subscription = Subscription(
            tenant_id,
            filters or Filters(),
            kind=kind,
            limit=self.queue_size,
            signals=signals,
            sink=sink,
        )
        topic.subscribers.add(subscription)
        try:
            if not topic.opened.done():
                await self._opened_or_drained(topic)
            if topic.opened.done():
                topic.opened.result()  # its failure, DatabaseUnavailable
                subscription.position = max(subscription.position, topic.delivered)
            # else shutting down (drain closed it): the stream ends at once.
            yield subscription
        finally:
            topic.subscribers.discard(subscription)
            if not topic.subscribers and self._topics.get(tenant_id) is topic:
                del self._topics[tenant_id]
                closing = self._closing[tenant_id] = asyncio.create_task(topic.close())
                closing.add_done_callback(functools.partial(self._closed, tenant_id))
                # Shielded: a cancelled stream must still unwatch. Not waited for when
                # shutting down: the stream ends now, whatever the database does (its
                # UNLISTEN); close() waits for the topic, within the runtime's stop.
                if not self.draining:
                    await asyncio.shield(closing)

    async def _opened_or_drained(self, topic: Topic) -> None:
        """Wait for ``topic`` to open (LISTEN, then a read), or the shutdown to begin: a
        stream whose tenant's topic waits on a database that stopped answering ends
        with the others."""
        drained = asyncio.ensure_future(self._drained.wait())
        try:
            either: set[asyncio.Future[Any]] = {topic.opened, drained}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()

    def newest_delivered(self, tenant_id: str) -> int | None:
        """The newest id handed to the tenant's subscribers, when its topic is open here
        (None otherwise): a committed id, and every later event of the tenant comes
        through the topic. A stream starting beside others of its tenant needs no query."""
        topic = self._topics.get(tenant_id)
        opened = topic.opened if topic is not None else None
        if topic is None or opened is None or not opened.done() or opened.cancelled():
            return None
        if opened.exception() is not None or topic.closed:
            return None
        return topic.delivered

    def _closed(self, tenant_id: str, task: asyncio.Task[None]) -> None:
        if self._closing.get(tenant_id) is task:
            del self._closing[tenant_id]

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
            queued, direct = subscription.offer(events)
            if queued:
                delivered[kind] = delivered.get(kind, 0) + queued
                if direct:
                    directly[kind] = directly.get(kind, 0) + queued
            if subscription.lagging:
                # Cut by this batch: the rest of it was not queued either.
                dropped[kind] = dropped.get(kind, 0) + len(events) - queued
                self._on_lagging(subscription)
        for kind, count in delivered.items():
            self._delivered(kind).inc(count)
        for kind, count in directly.items():
            self._delivered_directly(kind).inc(count)
        for kind, count in dropped.items():
            self._dropped(kind).inc(count)

    def _on_lagging(self, subscription: Subscription) -> None:
        self.metrics.lagging_disconnects.labels(subscription.kind).inc()
        sink = subscription.sink
        if sink is not None:
            asyncio.get_running_loop().call_later(LAGGING_GRACE_S, sink.abort)

    # -- the event source's wake-ups (pulse.bus.source.Wakeups) ------------------

    def events_after(self, tenant_id: str, last_id: int | None) -> None:
        topic = self._topics.get(tenant_id)
        if topic is not None and (last_id is None or last_id > topic.delivered):
            topic.dirty.set()

    def deliver(self, tenant_id: str, after: int, events: list[TelemetryEvent]) -> None:
        topic = self._topics.get(tenant_id)
        if topic is not None and events:
            topic.deliver(after, events)

    def signal(self, tenant_id: str, kind: str) -> None:
        topic = self._topics.get(tenant_id)
        if topic is not None:
            for subscription in list(topic.subscribers):
                subscription.notify(kind)

    def resync(self) -> None:
        # Anything may have been committed while nobody told us: every tenant re-reads.
        for topic in self._topics.values():
            topic.dirty.set()
            for subscription in list(topic.subscribers):
                for signal in subscription.signals:
                    subscription.notify(signal)

    # -- the process's life ---------------------------------------------------------

    def drain(self) -> None:
        """Shutting down: end every subscription now and refuse new ones."""
        self.draining = True
        self._drained.set()
        for topic in self._topics.values():
            for subscription in list(topic.subscribers):
                subscription.close()

    def subscriber_count(self) -> int:
        return sum(len(t.subscribers) for t in self._topics.values())

    async def close(self) -> None:
        """Close every topic, those already on their way out included."""
        self.draining = True
        topics, self._topics = list(self._topics.values()), {}
        for topic in topics:
            await topic.close()
        while self._closing:
            await asyncio.gather(*self._closing.values(), return_exceptions=True)
