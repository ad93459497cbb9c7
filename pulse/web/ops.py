"""Health, readiness, stream status and Prometheus metrics."""

from __future__ import annotations

import asyncio
import resource
import time
import weakref
from typing import Any, Literal

import asyncpg
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from quart import Blueprint, Response
from quart_schema import document_response, tag_blueprint

from pulse.db.errors import DatabaseUnavailable
from pulse.runtime import Runtime
from pulse.streams.limits import STREAM_KINDS
from pulse.web import openapi, runtime

blueprint = Blueprint("ops", __name__)
tag_blueprint(blueprint, ["operations"])


# -- documentation models (the handlers build the JSON themselves) ------------


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    """Ready (200) or not (503): the same body, saying what is missing."""

    status: Literal["ready", "unavailable"]
    database: bool
    listener: bool
    draining: bool


class Connections(BaseModel):
    total: int
    websocket: int
    sse: int
    legacy_v2: int


class Limits(BaseModel):
    max_connections: int
    max_connections_per_tenant: int
    max_device_filters: int
    queue_size: int
    max_open_files: int | None = Field(
        description="This process's limit of open files (each connection takes one); "
        "null: unlimited."
    )


class Listener(BaseModel):
    connected: bool
    channels: int
    last_notification_age_s: float | None
    reconnects: int


class StreamStatus(BaseModel):
    """This process's streams; degraded while its database listener is disconnected, or
    while reading tenants' new events from the table fails (a permission revoked, say:
    /readyz stays 200 then, since every process would fail alike)."""

    status: Literal["ok", "degraded"]
    reasons: list[str] = Field(description="Why degraded; empty when ok. No tenant ids.")
    connections: Connections
    limits: Limits
    listener: Listener
    uptime_s: float


@blueprint.get("/healthz")
@document_response(Health)
async def healthz() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@blueprint.get("/readyz")
@document_response(Readiness, 200)
@document_response(Readiness, 503)
async def readyz() -> tuple[dict[str, Any], int]:
    """Ready when the database answers, the listener is connected and we are not shutting down."""
    rt = runtime()
    database = await _database_answers(rt)
    listener = rt.source.connected
    ready = database and listener and not rt.draining
    body = {
        "status": "ready" if ready else "unavailable",
        "database": database,
        "listener": listener,
        "draining": rt.draining,
    }
    return body, 200 if ready else 503


@blueprint.get("/api/v1/telemetry/stream/status")
@document_response(StreamStatus)
async def stream_status() -> dict[str, Any]:
    """Connection counts, limits and listener health. No tenant ids, no auth."""
    rt = runtime()
    source = rt.source
    by_kind = {kind: rt.limits.by_kind[kind] for kind in STREAM_KINDS}
    last = source.last_wakeup_at
    reasons = [] if source.connected else ["the listener is disconnected"]
    if (problem := rt.hub.read_problem()) is not None:
        reasons.append(problem)
    return {
        "status": "degraded" if reasons else "ok",
        "reasons": reasons,
        "connections": {"total": sum(by_kind.values()), **by_kind},
        "limits": {
            "max_connections": rt.settings.max_connections,
            "max_connections_per_tenant": rt.settings.max_connections_per_tenant,
            "max_device_filters": rt.settings.max_device_filters,
            "queue_size": rt.settings.queue_size,
            "max_open_files": _open_files_limit(),
        },
        "listener": {
            "connected": source.connected,
            "channels": source.watched,
            "last_notification_age_s": None if last is None else round(time.monotonic() - last, 3),
            "reconnects": source.reconnects,
        },
        "bus": _bus(rt),
        "mqtt": _mqtt(rt),
        "uptime_s": round(time.monotonic() - rt.started_at, 3),
    }


def _open_files_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def _bus(rt: Runtime) -> dict[str, Any]:
    """How this process gets other processes' events: ``listen`` (every process LISTENs)
    or ``nats`` (PULSE_BUS_URL: one relay LISTENs and publishes on NATS); whether this
    process is the relay, whether its bus connection (NATS, or LISTEN) is up, and
    whether it falls back to LISTEN while NATS or the relay is away."""
    if rt.bus is None:
        return {"mode": "listen", "relay": False, "connected": rt.source.connected}
    return {
        "mode": "nats",
        "relay": rt.bus.relay.leading,
        "connected": rt.bus.link.connected,
        "fallback": rt.bus.source.falling_back,
    }


def _mqtt(rt: Runtime) -> dict[str, Any] | None:
    """Devices over MQTT (PULSE_MQTT_URL; null without): whether the broker connection is
    up, this process consumes the device topics, and the broker's device clients were
    checked against the devices since it connected."""
    if rt.mqtt is None:
        return None
    link = rt.mqtt.link
    return {
        "connected": link.connected,
        "subscribed": link.subscribed.is_set(),
        "synced": link.synced,
        "reconnects": link.reconnects,
        # Not its client id: shown to anyone, it named the session to take over (a broker
        # client free to choose its id would receive Pulse's readings). The log says it.
    }


@blueprint.get("/metrics")
@openapi.answers(200, "Prometheus text format.", "text/plain")
async def metrics() -> Response:
    """Prometheus metrics of this process."""
    return Response(runtime().metrics.exposition(), content_type=CONTENT_TYPE_LATEST)


_WRITABLE = "SELECT current_setting('transaction_read_only') = 'off'"


# Each runtime's probe of the database, while one is in flight (_database_answers), and
# when one was last given up on.
_probes: weakref.WeakKeyDictionary[Runtime, asyncio.Task[bool]] = weakref.WeakKeyDictionary()
_given_up: weakref.WeakKeyDictionary[Runtime, float] = weakref.WeakKeyDictionary()
PROBE_TIMEOUT_S = 2.0
# After a probe given up on, no other while a statement is still being cancelled, for
# at most this long: one pooled connection dead on its own (the others answering) keeps
# /readyz at 503 for that long, not for as long as the cancel waits (60 s).
REPROBE_S = 10.0


async def _database_answers(rt: Runtime) -> bool:
    """Whether the database answers, and can be written: read-only (a failover onto a
    server not yet promoted, default_transaction_read_only), it answers, but neither
    ingest nor a stream's admission can be served.

    Within PROBE_TIMEOUT_S, whatever the database does: the probe runs in a task of its
    own, which is not waited for past that. A query cancelled against a database that
    stopped answering (SIGSTOP, a machine gone) is cleaned up by asyncpg with a cancel
    request, which goes unanswered too: waited for, the answer took over 10 s. Probes
    do not pile up: while one is in flight, the next waits on it, and after one given up
    on, while a statement is still being cancelled (within REPROBE_S), the database has
    not answered yet (each probe took a pooled connection of its own and 2 s, else)."""
    probe = _probes.get(rt)
    if probe is None or probe.done():
        if rt.db.releasing and time.monotonic() - _given_up.get(rt, -REPROBE_S) < REPROBE_S:
            return False
        probe = _probes[rt] = asyncio.get_running_loop().create_task(_probe(rt))
    await asyncio.wait({probe}, timeout=PROBE_TIMEOUT_S)
    if not probe.done():
        probe.cancel()  # its cleanup goes on without us
        _given_up[rt] = time.monotonic()
        return False
    return not probe.cancelled() and probe.result()


async def _probe(rt: Runtime) -> bool:
    try:
        return bool(await rt.db.fetchval(_WRITABLE))
    except (DatabaseUnavailable, asyncpg.PostgresError, OSError, TimeoutError):
        return False  # an error for SELECT 1 is no answer either
