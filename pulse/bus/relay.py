"""The relay: the one process of a cluster that LISTENs, publishing every tenant's changes
on NATS (PULSE_BUS_URL).

Every process runs one and competes for a session advisory lock on a connection
of its own; the holder is the relay, and its connection is the database's only
listener (named ``pulse listener`` in pg_stat_activity, like every listener).
The others try again every ``RETRY_S``: when the relay dies, its connection
closes, PostgreSQL releases the lock and another process takes over within
about a second (the test kills it and measures).

The relay LISTENs on the one database-wide channel (``pulse_bus_channel()``,
migrations/0006), which carries every tenant's notifications. For each tenant
that committed, it reads the rows after the last it published (one read per
event for the whole cluster) and publishes them, encoded once, with the id
they follow. Device and alert changes go out as signals on the same subject.

Messages are sized to what the NATS server takes (``nats_link.message_limit``).
A message it refuses all the same while connected (one event larger than its
``max_payload``) is counted, said once per ``Throttled`` period, and passed
over: the next message's ``after`` shows the edges the gap, and a wake-up
(``nats_link.encode_wakeup``) makes them read it at once, so that one event
never holds up its tenant's later ones.

A reign is announced by a heartbeat with a fresh id, every ``HEARTBEAT_S``:
what was committed before this relay listened, it never publishes, so an
edge that sees a new id reads every tenant it serves from the table. A
reign ends with the NATS connection (``NatsLink.generation``): publishing
across a reconnect may lose messages, so the next reign, with a new id, makes
the edges read the table again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import asyncpg
import orjson

from pulse.bus import nats_link
from pulse.bus.listen import APPLICATION_NAME as LISTENER_NAME
from pulse.bus.nats_link import NatsLink
from pulse.bus.store import EventStore
from pulse.db.database import Database, translated
from pulse.db.errors import DatabaseUnavailable
from pulse.db.leadership import lock_is_free
from pulse.db.queries import load_queries
from pulse.logs import Throttled
from pulse.ops.metrics import Metrics

log = logging.getLogger(__name__)
Q = load_queries(__package__)

# Any constant the processes of a cluster share (advisory locks are per database).
RELAY_LOCK_KEY = 0x70756C73_65_726C  # "pulse" "rl"
STANDBY_NAME = "pulse relay standby"  # taking the lock; once it holds it, "pulse listener"
RETRY_S = 1.0
HEARTBEAT_S = 1.0
HEALTH_CHECK_S = 5.0
QUERY_TIMEOUT_S = 10.0
FETCH_LIMIT = 2000
WORKERS = 4  # tenants read and published at once


class NatsAway(Exception):
    """A publish failed because the NATS connection is down or going: the reign ends with
    it, and the next one's new id makes the edges read the table, so nothing is owed."""


class Relay:
    def __init__(
        self,
        db: Database,
        store: EventStore,
        link: NatsLink,
        database_id: str,
        metrics: Metrics,
        *,
        retry_s: float = RETRY_S,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self._db = db
        self._store = store
        self._unavailable = Throttled(log)  # a line per 10 s of an outage
        self._refused = Throttled(log)  # messages the server refused, a line per 10 s
        self._away = Throttled(log)
        self._link = link
        self._database_id = database_id
        self._metrics = metrics
        self._retry_s = retry_s
        self._heartbeat_s = heartbeat_s
        self.leading = False
        self.reigns = 0
        self._relay_id = ""
        # Per reign: the newest id published per tenant, what is due per tenant
        # ("telemetry" or a signal kind), and the tenants queued or being worked on.
        self._published: dict[str, int] = {}
        self._due: dict[str, set[str]] = {}
        self._scheduled: set[str] = set()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._stop = asyncio.Event()  # the reign's end: its connection or NATS lost
        link.on_change(self._on_link)

    async def run(self) -> None:
        """Stand by, relay when the lock is ours, forever (supervised)."""
        while True:
            await self._link.up.wait()
            try:
                # Standing by holds no connection of its own (pulse.db.leadership).
                if await lock_is_free(self._db, RELAY_LOCK_KEY, timeout=QUERY_TIMEOUT_S):
                    async with self._db.dedicated(STANDBY_NAME, timeout=QUERY_TIMEOUT_S) as conn:
                        await self._take_then_lead(conn)
            except DatabaseUnavailable as exc:
                self._unavailable.warning("relay: the database is unavailable (%s); retrying", exc)
            finally:
                if self.leading:
                    log.info("this process no longer relays")
                self.leading = False
                self._metrics.bus_relay.set(0)
            await asyncio.sleep(self._retry_s)

    async def _take_then_lead(self, conn: asyncpg.Connection) -> None:
        if not self._link.connected:
            return  # a relay must be able to publish: compete only while connected
        if not await conn.fetchval(Q["try_lead_relay"], RELAY_LOCK_KEY, timeout=QUERY_TIMEOUT_S):
            return  # another process took it first: stand by again
        generation = self._link.generation
        if not self._link.connected:
            return
        await self._lead(conn, generation)

    async def _lead(self, conn: asyncpg.Connection, generation: int) -> None:
        lost = asyncio.Event()
        self._stop = stop = asyncio.Event()

        def on_lost(_conn: object) -> None:
            lost.set()
            stop.set()

        conn.add_termination_listener(on_lost)
        # The listener's name in both modes, so that operators count listeners alike.
        await conn.execute(f"SET application_name = '{LISTENER_NAME}'", timeout=QUERY_TIMEOUT_S)
        channel = str(await conn.fetchval(Q["bus_channel"], timeout=QUERY_TIMEOUT_S))
        self._relay_id = uuid.uuid4().hex
        self._published, self._due, self._scheduled = {}, {}, set()
        self._queue = asyncio.Queue()
        await conn.add_listener(channel, self._on_notification)
        self.leading = True
        self.reigns += 1
        self._metrics.bus_relay.set(1)
        log.info("this process now relays the database's changes to NATS")
        workers = [
            asyncio.create_task(self._work(), name=f"pulse:relay-worker:{i}")
            for i in range(WORKERS)
        ]
        try:
            since_check = 0.0
            while self._link.connected and self._link.generation == generation:
                # After LISTEN: whatever commits from now on is published, and what
                # committed before, the edges read from the table on this new id.
                try:
                    if not await self._publish(
                        nats_link.relay_subject(self._database_id),
                        nats_link.encode_heartbeat(self._relay_id),
                        "heartbeat",
                    ):
                        return  # refused (said): a relay that cannot be heard stands down
                except Exception as exc:  # closed, or its buffer full while reconnecting
                    log.warning("relay: publishing a heartbeat failed (%s); standing down", exc)
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._heartbeat_s):
                        await stop.wait()
                if lost.is_set():
                    log.warning("relay: the listening connection was lost")
                    return
                since_check += self._heartbeat_s
                if since_check >= HEALTH_CHECK_S:
                    since_check = 0.0
                    with translated():
                        await conn.fetchval("SELECT 1", timeout=HEALTH_CHECK_S)
            log.warning("relay: the NATS connection was lost; standing down")
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _on_link(self, change: str) -> None:
        """NATS is down: from this moment this process relays no more (what it publishes
        may be lost), which the status and ``pulse_bus_relay`` say together with the
        connection, not at the next heartbeat; and its reign ends (``_lead``)."""
        if change != "down":
            return
        self._stop.set()
        if self.leading:
            self.leading = False
            self._metrics.bus_relay.set(0)
            log.info("this process no longer relays: NATS is down")

    # -- notifications -> messages ----------------------------------------------------

    def _on_notification(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        # Called by asyncpg for each notification: must never block.
        try:
            message = orjson.loads(payload)
            tenant, kind = str(message["tenant"]), str(message["kind"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            log.error("relay: ignoring a notification it cannot read: %.100r", payload)
            return
        if kind == "telemetry":
            first = message.get("first")
            if tenant not in self._published and isinstance(first, int):
                # Its first rows this reign: what came before, edges read from the table.
                self._published[tenant] = first - 1
        self._due.setdefault(tenant, set()).add(kind)
        if tenant not in self._scheduled:
            self._scheduled.add(tenant)
            self._queue.put_nowait(tenant)

    async def _work(self) -> None:
        """Take due tenants one at a time: a tenant is never worked on by two workers,
        so its messages go out in id order."""
        while True:
            tenant = await self._queue.get()
            try:
                while kinds := self._due.pop(tenant, None):
                    subject = nats_link.tenant_subject(self._database_id, tenant)
                    for kind in sorted(kinds - {"telemetry"}):
                        await self._publish(subject, nats_link.encode_signal(kind), "signal")
                    if "telemetry" in kinds and tenant in self._published:
                        await self._publish_events(tenant, subject)
            except DatabaseUnavailable as exc:
                log.warning("relay: reading a tenant's events failed (%s); retrying", exc)
                self._due.setdefault(tenant, set()).add("telemetry")
                await asyncio.sleep(0.5)
                self._queue.put_nowait(tenant)
                continue
            except NatsAway as exc:
                # The next reign's new id makes the edges read the table: nothing is owed.
                self._away.warning("relay: NATS went away while publishing (%s)", exc)
            except Exception:
                log.exception("relay: publishing a tenant's changes failed")
            self._scheduled.discard(tenant)
            if tenant in self._due:  # came in while a failure was handled
                self._scheduled.add(tenant)
                self._queue.put_nowait(tenant)

    async def _publish_events(self, tenant: str, subject: str) -> None:
        while True:
            after = self._published[tenant]
            events = await self._store.events_after(tenant, after, limit=FETCH_LIMIT)
            if not events:
                return
            client = self._link.client
            limit = nats_link.message_limit(
                client.max_payload if client is not None else nats_link.MAX_MESSAGE_BYTES
            )
            refused = False
            for message in nats_link.encode_events(after, events, limit):
                refused = not await self._publish(subject, message.data, "events")
                if not refused:
                    self._metrics.bus_events_relayed.inc(message.event_count)
                # Published, or refused while connected (counted and said): past it
                # either way. The next message's ``after`` shows the edges the gap.
                self._published[tenant] = message.last
            if refused:
                # No message followed the refused one: say there is something to read.
                await self._publish(subject, nats_link.encode_wakeup(events[-1].id), "wakeup")
            if len(events) < FETCH_LIMIT:
                return

    async def _publish(self, subject: str, payload: bytes, kind: str) -> bool:
        """Whether the message went out. False when the server refused it while connected
        (larger than its max_payload): counted, said, and the caller moves past it.
        Raises NatsAway when the connection is down or going."""
        client = self._link.client
        if client is None or not self._link.connected:
            self._metrics.bus_publish_failures.labels(kind).inc()
            raise NatsAway("not connected to NATS")
        try:
            await client.publish(subject, payload)
        except Exception as exc:
            self._metrics.bus_publish_failures.labels(kind).inc()
            reason = str(exc) or type(exc).__name__
            if not (self._link.connected and self._link.client is client and client.is_connected):
                raise NatsAway(reason) from exc
            self._refused.warning(
                "relay: NATS refused a %d-byte %s message on %s (%s; the server takes "
                "%d); the edges read what it held from the table",
                len(payload),
                kind,
                subject,
                reason,
                client.max_payload,
            )
            return False
        self._metrics.bus_messages_relayed.labels(kind).inc()
        return True
