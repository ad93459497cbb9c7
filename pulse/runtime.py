"""The running process: everything it owns, built by one lifespan in data-flow order.

``open_runtime(settings)`` makes, in the order a reading travels: the database,
the stream connection limits, the event source and the hub it feeds (LISTEN,
or with PULSE_BUS_URL the NATS edge with LISTEN as its fallback), the writer
with its transaction hooks (alert rules), and then the supervised side tasks
that keep them going (the NATS connection, the event source, the connection
leases, retention, the rollups, the device status sweeper, the relay, MQTT). It yields
a ``Runtime`` that is complete, and on the way out stops everything in reverse order.

Nothing here knows HTTP: the web layer (``pulse.web``) is handed the Runtime.
A second event source or a second intake is one more module, and one more
line here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import operator
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import asyncpg

from pulse.auth.tickets import Tickets
from pulse.auth.tokens import TokenVerifier
from pulse.bus.hub import Hub
from pulse.bus.listen import ListenSource
from pulse.bus.source import EventSource
from pulse.bus.store import EventStore
from pulse.config import Settings
from pulse.db.database import Database
from pulse.db.embedded import embedded_database
from pulse.db.errors import DatabaseUnavailable, refusal
from pulse.db.migrate import MigrationError, pending, unknown, warn_unknown
from pulse.db.pool import describe
from pulse.db.retention import (
    PartitionsNotManageable,
    check_partitions_manageable,
    ensure_partitions,
    run_retention,
)
from pulse.db.vacuum import left_unvacuumed, warn_unvacuumed
from pulse.fleet.devices import NO_CREDENTIALS, Credentials
from pulse.fleet.rules import evaluate_alerts
from pulse.fleet.sweeper import StatusSweeper
from pulse.history.exports import JSON_ANSWERS, Slots
from pulse.history.rollups import Rollups, RollupSettings
from pulse.ingest.buffer import IngestBuffer
from pulse.ingest.ratelimit import Admission, RateLimiter
from pulse.ingest.service import Ingest
from pulse.ingest.writer import SEEN_PRECISION_S, TelemetryWriter
from pulse.logs import INSTANCE_WIDE
from pulse.ops.metrics import Metrics
from pulse.ops.supervisor import Supervisor
from pulse.streams.legacy_v2.reads import FleetReads
from pulse.streams.limits import STREAM_KINDS, ConnectionLimits

if TYPE_CHECKING:
    from pulse.bus.nats_link import NatsLink
    from pulse.bus.nats_source import NatsSource
    from pulse.bus.relay import Relay
    from pulse.mqtt.service import Mqtt

log = logging.getLogger(__name__)

# What the runtime's own stop gets at least, should the requests in flight have taken
# the whole PULSE_SHUTDOWN_TIMEOUT_S: a healthy stop takes a tenth of it.
MIN_STOP_S = 1.0


class ShutdownClock:
    """PULSE_SHUTDOWN_TIMEOUT_S, counted from the shutdown's start (SIGTERM: ``drain``),
    or from the runtime's stop when nothing drained it first."""

    def __init__(self, timeout_s: float, least_s: float = MIN_STOP_S) -> None:
        self.timeout_s = timeout_s
        self.least_s = least_s
        self._deadline: float | None = None

    def start(self) -> None:
        if self._deadline is None:
            self._deadline = time.monotonic() + self.timeout_s

    def left(self) -> float:
        """The seconds left for the runtime's stop, ``least_s`` at least."""
        self.start()
        assert self._deadline is not None
        return max(self._deadline - time.monotonic(), self.least_s)


def least_stop_s(settings: Settings) -> float:
    """What the runtime's stop gets at least: MIN_STOP_S, or with MQTT the time it
    gives the broker to settle what it took before leaving the shared subscription
    (LEAVE_TIMEOUT_S, documented as up to 5 s), and a second."""
    if settings.mqtt_url is None:
        return MIN_STOP_S
    from pulse.mqtt.link import LEAVE_TIMEOUT_S

    return LEAVE_TIMEOUT_S + MIN_STOP_S


@dataclasses.dataclass(frozen=True)
class Runtime:
    settings: Settings
    metrics: Metrics
    verifier: TokenVerifier
    db: Database
    limits: ConnectionLimits
    source: EventSource
    bus: Bus | None  # with PULSE_BUS_URL
    store: EventStore
    hub: Hub
    ingest: Ingest
    ingest_buffer: IngestBuffer
    tickets: Tickets
    # Stream tickets issued, per principal (tenant_id, subject).
    ticket_limit: RateLimiter
    fleet_reads: FleetReads
    exports: Slots  # history exports streaming at once
    history_reads: Slots  # history JSON answers read and sent at once
    mqtt: Mqtt | None  # with PULSE_MQTT_URL
    # The device API tells it of new, rotated and deleted tokens (the MQTT broker).
    device_credentials: Credentials
    supervisor: Supervisor
    started_at: float
    shutdown: ShutdownClock

    @property
    def draining(self) -> bool:
        """Shutting down: streams end, new ones are refused (the hub keeps the flag)."""
        return self.hub.draining

    def drain(self) -> None:
        """Shutting down: streams end now; requests in flight have
        PULSE_SHUTDOWN_TIMEOUT_S (the server's graceful timeout) from now, and the writes
        still waiting a second before it are ended (``TelemetryWriter.stop``): their
        callers get a 503 rather than a cut connection, and nothing begins after (a
        write whose COMMIT went out has half a second more to finish).
        The runtime's stop then has what is left of that time (``_stop``)."""
        self.shutdown.start()
        self.limits.drain()  # the streams ending now are closed before their slots are freed
        self.hub.drain()
        timeout = self.settings.shutdown_timeout_s
        at = max(timeout - 1.0, timeout / 2)
        # A write whose COMMIT went out gets half of what is left to finish.
        asyncio.get_running_loop().call_later(at, self.ingest.writer.stop, (timeout - at) / 2)


@dataclasses.dataclass(frozen=True)
class Bus:
    """NATS between the processes: the connection, this edge's source, the relay."""

    link: NatsLink
    source: NatsSource
    relay: Relay


class StartupError(Exception):
    """What keeps the process from starting, in one sentence for the operator."""


def check_settings(settings: Settings) -> None:
    """What must hold before anything starts (StartupError otherwise): a process that
    cannot serve says so first, before any warning about how it would have served."""
    if not settings.jwt_secret and not settings.jwks_url:
        raise StartupError(
            "no way to verify tokens: set PULSE_JWT_SECRET (HS256) or PULSE_JWKS_URL "
            "(your identity provider's keys)"
        )


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings) -> AsyncIterator[Runtime]:
    check_settings(settings)
    if settings.jwks_url and urlsplit(settings.jwks_url).scheme == "http":
        # Taken (a local identity provider, a test), not silently: keys fetched in the
        # clear can be swapped on the way, and with them any token forged, an
        # operator's included (a review, 8 December).
        log.warning(
            "PULSE_JWKS_URL is http://: the signing keys travel unencrypted, and whoever "
            "can change them on the way can forge any token; use https:// beyond a "
            "trusted network",
            extra=INSTANCE_WIDE,
        )
    metrics = Metrics(bus=settings.bus_url is not None, mqtt=settings.mqtt_url is not None)
    shutdown = ShutdownClock(settings.shutdown_timeout_s, least_stop_s(settings))
    async with contextlib.AsyncExitStack() as stack:
        db = await _open_database(stack, settings)
        # What runs is stopped newest first, then the pool closed, all within the
        # shutdown's time (_stop).
        stops: list[Stop] = []
        stack.push_async_callback(_stop, db, shutdown, stops, settings)
        await _ensure_partitions(db)

        limits = ConnectionLimits(
            db,
            settings.max_connections,
            settings.max_connections_per_tenant,
            ttl_s=settings.connection_lease_ttl_s,
        )
        await limits.start()
        stops.append(Stop("forgetting this process's stream connections", limits.stop))

        store = EventStore(db)
        listen = ListenSource(
            db,
            backoff_max_s=settings.listener_backoff_max_s,
            on_reconnected=metrics.listener_reconnects.inc,
        )
        bus = await _open_bus(settings, db, store, listen, metrics) if settings.bus_url else None
        source: EventSource = listen if bus is None else bus.source
        hub = Hub(store, source, metrics, queue_size=settings.queue_size)
        stops.append(Stop("closing the stream hub", hub.close))

        admission = Admission(
            per_device=RateLimiter(
                settings.ingest_rate_per_device, settings.ingest_burst_per_device
            ),
            per_tenant=RateLimiter(
                settings.ingest_rate_per_tenant, settings.ingest_burst_per_tenant
            ),
        )
        writer = TelemetryWriter(
            db,
            admit=admission.each,
            refund=admission.refund,  # what a write refused 503 (not stored) had taken
            rules=evaluate_alerts,
            group_commit=settings.group_commit,
            on_remade=metrics.ingest_writes_remade.inc,
            # Well within the time after which the sweeper calls a silent device STALE.
            seen_precision_s=min(SEEN_PRECISION_S, settings.stale_after_s / 10),
        )

        ingest = Ingest(writer, metrics)
        mqtt = (
            _open_mqtt(settings, db, ingest, metrics, limits.process_id)
            if settings.mqtt_url
            else None
        )

        ingest_buffer = IngestBuffer(int(settings.ingest_buffer_mb * 1024 * 1024))
        metrics.sample(
            metrics.ingest_buffered_bytes,
            lambda: ingest_buffer.held + ingest_buffer.held_verified,
        )
        exports = Slots(
            # Ingest and streams keep at least one pooled connection.
            min(settings.max_exports, settings.db_pool_size - 1),
            settings.max_exports_per_tenant,
        )
        metrics.sample(metrics.history_exports, lambda: exports.held)
        history_reads = Slots(
            settings.max_history_reads, settings.max_history_reads_per_tenant, JSON_ANSWERS
        )
        metrics.sample(metrics.history_reads, lambda: history_reads.held)

        supervisor = Supervisor()
        stops.append(Stop("stopping the side tasks", supervisor.stop, supervisor.stopping))
        if bus is not None:
            supervisor.start("bus", bus.link.run)
        supervisor.start("listener", functools.partial(source.run, hub))
        supervisor.start("connection-leases", limits.keep_alive)
        supervisor.start(
            "retention",
            functools.partial(
                run_retention,
                db,
                settings.retention_hours,
                settings.retention_interval_s,
                alert_retention_days=settings.alert_retention_days,
            ),
        )
        rollups = Rollups(db, RollupSettings.of(settings))
        supervisor.start("rollups", rollups.run)
        metrics.sample(metrics.rollups_keeper, lambda: rollups.leading)
        sweeper = StatusSweeper(
            db, stale_after_s=settings.stale_after_s, offline_after_s=settings.offline_after_s
        )
        supervisor.start("status-sweeper", sweeper.run)
        metrics.sample(metrics.status_sweeper, sweeper.leading.is_set)
        if bus is not None and settings.bus_relay:
            supervisor.start("relay", bus.relay.run)
        if mqtt is not None:
            supervisor.start("mqtt", mqtt.run)
        _sample_process(metrics, db, limits, source, bus)
        if metrics.shared_dir is not None:
            supervisor.start("metrics", metrics.keep_fresh)

        yield Runtime(
            settings=settings,
            metrics=metrics,
            verifier=TokenVerifier.from_settings(settings),
            db=db,
            limits=limits,
            source=source,
            bus=bus,
            store=store,
            hub=hub,
            ingest=ingest,
            ingest_buffer=ingest_buffer,
            tickets=Tickets(db),
            ticket_limit=RateLimiter(settings.ticket_rate_per_s, settings.ticket_burst),
            fleet_reads=FleetReads(db),
            exports=exports,
            history_reads=history_reads,
            mqtt=mqtt,
            device_credentials=NO_CREDENTIALS if mqtt is None else mqtt.provisioner,
            supervisor=supervisor,
            started_at=time.monotonic(),
            shutdown=shutdown,
        )


@dataclasses.dataclass(frozen=True)
class Stop:
    """One step of the runtime's stop; ``left``: what it still waits on, when cut short."""

    what: str
    run: Callable[[], Awaitable[None]]
    left: Callable[[], list[str]] | None = None


async def _stop(
    db: Database, shutdown: ShutdownClock, stops: list[Stop], settings: Settings
) -> None:
    """Run ``stops`` newest first, then close the pool, within what is left of the
    shutdown's time (PULSE_SHUTDOWN_TIMEOUT_S from SIGTERM, least_stop_s at least).

    A database that stopped answering (SIGSTOPped, a machine gone: its connections open,
    nothing answered) holds each step on a statement, and a task cancelled in the middle
    of one waits for the server's answer to the cancel. When the time is up, what is left
    is given up: the pool's connections are closed unanswered (every statement still
    waiting on them ends), and this process's stream connections, not forgotten, stop
    counting when its lease lapses (PULSE_CONNECTION_LEASE_TTL_S).
    """
    at = [len(stops)]  # the step under way (-1: closing the pool)

    async def in_order() -> None:
        for step in reversed(range(len(stops))):
            at[0] = step
            try:
                await stops[step].run()
            except Exception:  # the next steps still run, as on an exit stack
                log.exception("shutting down: %s failed", stops[step].what)
        at[0] = -1
        await db.close()

    # A task of its own, waited for rather than awaited under a timeout: a step that
    # takes its cancellation for something else's cannot hold the process.
    stopping = asyncio.get_running_loop().create_task(in_order())
    try:
        done, _ = await asyncio.wait({stopping}, timeout=shutdown.left())
    finally:
        stopping.cancel()
    if done:
        return stopping.result()
    db.terminate()
    given_up = []
    for stop in reversed(stops[: at[0] + 1]):
        still = stop.left() if stop.left is not None else []
        given_up.append(f"{stop.what} ({', '.join(still)})" if still else stop.what)
    log.warning(
        "shutting down: did not stop within %g s: the database (or another service it "
        "uses) stopped answering; gave up on %s, and closed the database connections "
        "unanswered (this process's stream connections stop counting within "
        "PULSE_CONNECTION_LEASE_TTL_S, %g s)",
        shutdown.timeout_s,
        "; ".join(given_up) or "closing the database pool",
        settings.connection_lease_ttl_s,
    )


def _sample_process(
    metrics: Metrics, db: Database, limits: ConnectionLimits, source: EventSource, bus: Bus | None
) -> None:
    """The gauges read off the process when scraped (or refreshed); and every stream
    kind's counters made at 0, so that a rate over them is 0, not "no data", until the
    first event of that kind."""
    for kind in STREAM_KINDS:
        for counter in (
            metrics.events_delivered,
            metrics.events_delivered_directly,
            metrics.events_dropped_lagging,
            metrics.lagging_disconnects,
        ):
            counter.labels(kind)
        # by_kind is a Counter: 0 for a kind with no connection
        metrics.sample(
            metrics.connections.labels(kind), functools.partial(limits.by_kind.__getitem__, kind)
        )
    metrics.sample(metrics.listener_connected, lambda: source.connected)
    if bus is not None:
        assert metrics.bus_connected is not None, "made where NATS is configured"
        metrics.sample(metrics.bus_connected, lambda: bus.link.connected)
    metrics.sample(metrics.db_pool_connections.labels("idle"), lambda: db.pool_usage()[1])
    metrics.sample(
        metrics.db_pool_connections.labels("in_use"), lambda: operator.sub(*db.pool_usage())
    )
    metrics.sample(metrics.asyncio_tasks, lambda: len(asyncio.all_tasks()))
    metrics.sample(metrics.python_allocated_blocks, sys.getallocatedblocks)
    metrics.sample(metrics.python_full_collections, lambda: gc.get_stats()[2]["collections"])


async def _open_bus(
    settings: Settings, db: Database, store: EventStore, listen: ListenSource, metrics: Metrics
) -> Bus:
    """The edge source (LISTEN is its fallback) and the relay, on one NATS connection."""
    # Imported here: a process without NATS does not load its client.
    from pulse.bus import nats_link
    from pulse.bus.nats_link import NatsLink
    from pulse.bus.nats_source import NatsSource
    from pulse.bus.relay import Relay

    assert settings.bus_url
    try:
        database_id = await nats_link.database_id(db)
    except DatabaseUnavailable as exc:
        raise StartupError(f"cannot use the database {exc}") from exc
    link = NatsLink(settings.bus_url)
    return Bus(
        link=link,
        source=NatsSource(link, listen, db, database_id, metrics),
        relay=Relay(db, store, link, database_id, metrics),
    )


def _open_mqtt(
    settings: Settings, db: Database, ingest: Ingest, metrics: Metrics, process_id: uuid.UUID
) -> Mqtt:
    """Devices over MQTT: the second intake, and the broker's device credentials."""
    # Imported here: a process without MQTT does not load its client.
    from pulse.mqtt.service import Mqtt

    assert settings.mqtt_url
    try:
        return Mqtt(
            settings.mqtt_url,
            settings.mqtt_client_id,
            db,
            ingest,
            metrics,
            process_id=process_id,
            ca_file=settings.mqtt_ca_file,
        )
    except ValueError as exc:
        raise StartupError(f"PULSE_MQTT_URL: {exc}") from exc


async def _ensure_partitions(db: Database) -> None:
    """Ingest's days exist before it starts (the retention task keeps them ahead, which
    this role must be allowed to)."""
    try:
        await check_partitions_manageable(db)
        await ensure_partitions(db)
    except PartitionsNotManageable as exc:
        raise StartupError(f"cannot use the database {db.describe()}: {exc}") from None
    except DatabaseUnavailable as exc:
        raise StartupError(f"cannot use the database {db.describe()}: {exc}") from exc
    except asyncpg.LockNotAvailableError:
        pass  # another process is changing the partitions: they are days ahead already
    except asyncpg.PostgresError as exc:  # a permission missing, say
        raise StartupError(
            f"cannot use the database {db.describe()}: {refusal(exc, migrating=False)}"
        ) from exc


async def _open_database(stack: contextlib.AsyncExitStack, settings: Settings) -> Database:
    """DATABASE_URL's database, which must be migrated, or the embedded one, migrated here."""
    try:
        dsn = settings.database_url
        if not dsn:
            dsn = await stack.enter_async_context(embedded_database(settings.data_dir))
        db = await stack.enter_async_context(
            Database.open(
                dsn,
                pool_size=settings.db_pool_size,
                connect_timeout=settings.db_connect_timeout_s,
            )
        )
    except DatabaseUnavailable as exc:  # it names the database
        raise StartupError(f"cannot use the database {exc}") from exc
    except MigrationError as exc:
        raise StartupError(f"cannot migrate the embedded database: {exc}") from exc
    except asyncpg.PostgresError as exc:  # the connections' set-up refused
        raise StartupError(
            f"cannot use the database {describe(dsn or '')}: {refusal(exc, migrating=False)}"
        ) from exc
    try:
        async with db.connection() as conn:
            missing = await pending(conn)
            newer = await unknown(conn)
            unvacuumed = await left_unvacuumed(conn)
    except DatabaseUnavailable as exc:
        raise StartupError(f"cannot use the database {db.describe()}: {exc}") from exc
    except asyncpg.PostgresError as exc:  # no SELECT on pulse_migrations, say
        raise StartupError(
            f"cannot use the database {db.describe()}: {refusal(exc, migrating=False)}"
        ) from exc
    if missing:
        raise StartupError(
            f"the database {db.describe()} is not migrated ({len(missing)} migrations to "
            f"apply, from {missing[0]}): run `pulse migrate` with the same DATABASE_URL"
        )
    if settings.database_url:  # (the embedded one's migration said it)
        warn_unknown(newer, db.describe())  # a rollback, or an old process restarted mid-deploy
    warn_unvacuumed(*unvacuumed, db.describe())
    return db
