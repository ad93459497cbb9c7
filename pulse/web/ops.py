"""Health, readiness, stream status and Prometheus metrics."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Blueprint, Response

from pulse.db.errors import DatabaseUnavailable
from pulse.runtime import Runtime
from pulse.web import runtime

blueprint = Blueprint("ops", __name__)

STREAM_KINDS = ("websocket", "sse", "legacy_v2")


@blueprint.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving."""
    return {"status": "ok"}


@blueprint.get("/readyz")
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
async def stream_status() -> dict[str, Any]:
    """Connection counts, limits and listener health. No tenant ids, no auth."""
    rt = runtime()
    source = rt.source
    by_kind = {kind: rt.limits.by_kind[kind] for kind in STREAM_KINDS}
    last = source.last_wakeup_at
    return {
        "status": "ok" if source.connected else "degraded",
        "connections": {"total": sum(by_kind.values()), **by_kind},
        "limits": {
            "max_connections": rt.settings.max_connections,
            "max_connections_per_tenant": rt.settings.max_connections_per_tenant,
            "max_device_filters": rt.settings.max_device_filters,
            "queue_size": rt.settings.queue_size,
        },
        "listener": {
            "connected": source.connected,
            "channels": source.watched,
            "last_notification_age_s": None if last is None else round(time.monotonic() - last, 3),
            "reconnects": source.reconnects,
        },
        "bus": _bus(rt),
        "uptime_s": round(time.monotonic() - rt.started_at, 3),
    }


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


@blueprint.get("/metrics")
async def metrics() -> Response:
    rt = runtime()
    for kind in STREAM_KINDS:
        rt.metrics.connections.labels(kind).set(rt.limits.by_kind[kind])
    rt.metrics.listener_connected.set(1 if rt.source.connected else 0)
    if rt.bus is not None:
        rt.metrics.bus_connected.set(1 if rt.bus.link.connected else 0)
    size, idle = rt.db.pool_usage()
    rt.metrics.db_pool_connections.labels("idle").set(idle)
    rt.metrics.db_pool_connections.labels("in_use").set(size - idle)
    rt.metrics.asyncio_tasks.set(len(asyncio.all_tasks()))
    rt.metrics.python_allocated_blocks.set(sys.getallocatedblocks())
    return Response(generate_latest(rt.metrics.registry), content_type=CONTENT_TYPE_LATEST)


async def _database_answers(rt: Runtime) -> bool:
    try:
        async with asyncio.timeout(2):
            return bool(await rt.db.fetchval("SELECT 1"))
    except (DatabaseUnavailable, TimeoutError):
        return False
