"""The NATS event source: an edge of the cluster, fed by the relay (PULSE_BUS_URL).

It subscribes to the subject of each tenant this process serves, from the
hub's ``watch`` (its first subscriber) to ``unwatch`` (its last), and to
nothing else but the relay's heartbeats. Each message hands the hub the
events themselves with the id they follow (``Wakeups.deliver``): no query per
event. The hub reads from the table whatever does not follow what it
delivered, and this source makes it read every tenant again (``resync``)
whenever messages may have been lost with no later message to show it: a new
relay (its heartbeat carries a new id), a reconnect, a slow consumer, the end
of a fallback. Every ``AUDIT_S`` it also compares the tenants' newest ids in
the table with what was delivered, one query for all, so that even a loss
nothing announced is read within seconds.

The bus is "up" while NATS is connected and a relay's heartbeat came within
``RELAY_SILENCE_S``. While it is not, this process falls back to today's
LISTEN (``pulse.bus.listen``, on its tenants' own channels) until it is back:
clients see a listener's latency, and no error. LISTEN rather than polling:
it keeps the change signals of the v2 streams (alerts, fleet), which no table
of ids shows, and the fallback is the code every process without NATS runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from pulse.bus import nats_link
from pulse.bus.listen import ListenSource
from pulse.bus.nats_link import Events, NatsLink, Signal
from pulse.bus.source import Wakeups
from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.queries import load_queries
from pulse.ops.metrics import Metrics

log = logging.getLogger(__name__)
Q = load_queries(__package__)

RELAY_SILENCE_S = 3.0  # three missed heartbeats: the relay is gone, or cut off
AUDIT_S = 5.0
TICK_S = 0.25
WATCH_TIMEOUT_S = 10.0
FLUSH_TIMEOUT_S = 2


class NatsSource:
    def __init__(
        self,
        link: NatsLink,
        fallback: ListenSource,
        db: Database,
        database_id: str,
        metrics: Metrics,
        *,
        relay_silence_s: float = RELAY_SILENCE_S,
        audit_s: float = AUDIT_S,
    ) -> None:
        self._link = link
        self._fallback = fallback
        self._db = db
        self._database_id = database_id
        self._metrics = metrics
        self._relay_silence_s = relay_silence_s
        self._audit_s = audit_s
        self._watched: set[str] = set()
        self._subscriptions: dict[str, Subscription] = {}
        # Watched, and no subscription on the current client yet: a set of its own, so
        # that a storm of N tenants' watches costs N steps, not N times the watched.
        self._unsubscribed: set[str] = set()
        self._heartbeats: Subscription | None = None
        self._subscribed_on: Client | None = None  # the client those belong to
        self._lock = asyncio.Lock()  # subscription changes, one at a time
        self._wakeups: Wakeups | None = None
        self._relay_id: str | None = None
        self._relay_seen_at: float | None = None
        self._changed = asyncio.Event()
        self._fallback_task: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self._ever_on_bus = False
        self._bus_wakeup_at: float | None = None  # the last message from the bus
        link.on_change(self._on_link)

    # -- state --------------------------------------------------------------------------

    @property
    def last_wakeup_at(self) -> float | None:
        """The last wake-up from the bus or, while it is away, from the fallback's LISTEN."""
        times = [t for t in (self._bus_wakeup_at, self._fallback.last_wakeup_at) if t is not None]
        return max(times, default=None)

    @property
    def on_bus(self) -> bool:
        """NATS is connected and a relay publishes."""
        seen = self._relay_seen_at
        return (
            self._link.connected
            and seen is not None
            and time.monotonic() - seen < self._relay_silence_s
        )

    @property
    def falling_back(self) -> bool:
        return self._fallback_task is not None

    @property
    def connected(self) -> bool:
        return self.on_bus or self._fallback.connected

    @property
    def watched(self) -> int:
        return len(self._watched)

    @property
    def reconnects(self) -> int:
        return self._link.reconnects + self._fallback.reconnects

    # -- the hub's side -----------------------------------------------------------------

    async def watch(self, tenant_id: str) -> None:
        """Subscribed from the return on, or listening when the bus is away."""
        self._watched.add(tenant_id)
        if tenant_id not in self._subscriptions:
            self._unsubscribed.add(tenant_id)
        # Registered with the fallback too, which listens whenever it runs.
        await self._fallback.want(tenant_id)
        # Subscribed on a connected bus; else when it connects (``run``).
        client = await self._ensure_subscribed()
        if client is not None:
            await self._flushed(client)
        try:
            async with asyncio.timeout(WATCH_TIMEOUT_S):
                while not self.connected:  # noqa: ASYNC110  rare: neither bus nor listener is up
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise DatabaseUnavailable("neither the bus nor the listener is connected") from None

    async def unwatch(self, tenant_id: str) -> None:
        self._watched.discard(tenant_id)
        self._unsubscribed.discard(tenant_id)
        async with self._lock:
            subscription = self._subscriptions.pop(tenant_id, None)
            if subscription is not None:
                try:
                    await subscription.unsubscribe()
                except Exception as exc:  # closed, reconnecting: gone with the connection
                    log.debug("bus: unsubscribing failed: %s", exc)
        await self._fallback.unwatch(tenant_id)

    async def run(self, wakeups: Wakeups) -> None:
        """Follow the bus, falling back while it is away, for as long as the task lives."""
        self._wakeups = wakeups
        last_audit = time.monotonic()
        try:
            while True:
                self._changed.clear()
                # Back on NATS only with every tenant subscribed: until then the
                # fallback delivers.
                client = await self._ensure_subscribed()
                if client is not None and self.on_bus:
                    self._ever_on_bus = True
                    if self._fallback_task is not None and await self._flushed(client):
                        await self._stop_fallback()
                        log.info("bus: back on NATS; the fallback listener is closed")
                        # What committed while switching back is in the table.
                        self._resync("bus_back")
                    if time.monotonic() - last_audit >= self._audit_s:
                        last_audit = time.monotonic()
                        await self._audit()
                elif self._should_fall_back():
                    self._start_fallback()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(TICK_S):
                        await self._changed.wait()
        finally:
            # Stopping, not back on NATS (which the fallback's end said, and was false when
            # NATS never came).
            await self._stop_fallback()
            async with self._lock:
                await self._unsubscribe_all()

    def _should_fall_back(self) -> bool:
        task = self._fallback_task
        if task is not None and task.done():
            log.error("bus: the fallback listener stopped; starting it again")
            self._fallback_task = None
            task = None
        if task is not None:
            return False
        # At start, a relay has a moment to be heard before this process listens.
        return self._ever_on_bus or time.monotonic() - self._started_at >= self._relay_silence_s

    # -- subscriptions --------------------------------------------------------------------

    async def _ensure_subscribed(self) -> Client | None:
        """The current client, with a subscription for every tenant watched (which the
        server has once it answers a flush: ``_flushed``). None while NATS is away, or
        when subscribing failed (tried again at the next tick of ``run``). A new
        client, after a restart of the link, has no subscription; a client that
        reconnected has those it had, and none for the tenants watched while it was
        away."""
        client = self._link.client if self._link.connected else None
        if client is None:
            return None
        if client is self._subscribed_on and not self._unsubscribed:
            return client
        async with self._lock:
            try:
                if client is not self._subscribed_on:
                    await self._unsubscribe_all()  # those of a client gone, if any
                    self._heartbeats = await client.subscribe(
                        nats_link.relay_subject(self._database_id), cb=self._on_heartbeat
                    )
                    self._subscribed_on = client
                for tenant_id in sorted(self._unsubscribed):
                    self._subscriptions[tenant_id] = await self._subscribe(client, tenant_id)
                    self._unsubscribed.discard(tenant_id)
            except Exception as exc:
                log.warning("bus: subscribing failed (%s); trying again", exc)
                await self._unsubscribe_all()
                return None
        return client

    async def _flushed(self, client: Client) -> bool:
        """Whether the server answered: it then has every subscription made before,
        and what the relay publishes from then on comes here."""
        try:
            await client.flush(timeout=FLUSH_TIMEOUT_S)
        except Exception as exc:
            log.debug("bus: no answer to a flush: %s", str(exc) or type(exc).__name__)
            return False
        return True

    async def _subscribe(self, client: Client, tenant_id: str) -> Subscription:
        return await client.subscribe(
            nats_link.tenant_subject(self._database_id, tenant_id),
            cb=functools.partial(self._on_message, tenant_id),
        )

    async def _unsubscribe_all(self) -> None:
        """Best effort (the lock held): on a closed connection they are gone already."""
        subscriptions = [*self._subscriptions.values(), self._heartbeats]
        self._subscriptions, self._heartbeats, self._subscribed_on = {}, None, None
        self._unsubscribed = set(self._watched)
        for subscription in subscriptions:
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    # -- messages -------------------------------------------------------------------------

    async def _on_message(self, tenant_id: str, msg: Msg) -> None:
        wakeups = self._wakeups
        if wakeups is None or tenant_id not in self._watched:
            return
        self._bus_wakeup_at = time.monotonic()
        try:
            message = nats_link.decode(msg.data)
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
            log.error("bus: ignoring a message it cannot read (%s): %.100r", exc, msg.data)
            return
        if isinstance(message, Events) and not message.events:
            # Events the relay could not publish (nats_link.encode_wakeup): read them.
            self._metrics.bus_messages_received.labels("wakeup").inc()
            wakeups.events_after(tenant_id, message.after)
        elif isinstance(message, Events):
            self._metrics.bus_messages_received.labels("events").inc()
            wakeups.deliver(tenant_id, message.after, message.events)
        elif isinstance(message, Signal):
            self._metrics.bus_messages_received.labels("signal").inc()
            wakeups.signal(tenant_id, message.kind)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            relay = nats_link.decode_heartbeat(msg.data)
        except orjson.JSONDecodeError:
            relay = None
        if relay is None:
            return
        self._metrics.bus_messages_received.labels("heartbeat").inc()
        was_on_bus = self.on_bus
        self._relay_seen_at = time.monotonic()
        if relay != self._relay_id:
            # A new reign: what committed before it listened was never published.
            self._relay_id = relay
            self._resync("relay")
        if not was_on_bus:
            self._changed.set()

    def _on_link(self, change: str) -> None:
        if change == "down":
            self._relay_seen_at = None  # off the bus at once: fall back now
        elif change == "slow_consumer":
            # This process dropped messages it could not take fast enough.
            self._resync("slow_consumer")
        self._changed.set()

    def _resync(self, reason: str) -> None:
        if self._wakeups is not None:
            self._metrics.bus_resyncs.labels(reason).inc()
            self._wakeups.resync()

    async def _audit(self) -> None:
        """Tell the hub each tenant's newest id: it reads what it has not delivered."""
        wakeups = self._wakeups
        if wakeups is None or not self._watched:
            return
        try:
            rows = await self._db.fetch(Q["newest_event_ids"], sorted(self._watched))
        except DatabaseUnavailable as exc:
            log.warning("bus: the audit of delivered ids failed: %s", exc)
            return
        for tenant_id, newest in rows:
            wakeups.events_after(tenant_id, newest)

    # -- the fallback -----------------------------------------------------------------------

    def _start_fallback(self) -> None:
        assert self._wakeups is not None
        log.warning("bus: NATS or its relay is away; delivering through LISTEN until it is back")
        self._metrics.bus_fallbacks.inc()
        self._metrics.bus_fallback.set(1)
        self._fallback_task = asyncio.create_task(
            self._fallback.run(self._wakeups), name="pulse:bus-fallback"
        )

    async def _stop_fallback(self) -> None:
        task, self._fallback_task = self._fallback_task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        self._metrics.bus_fallback.set(0)
