"""Health, readiness, stream status and Prometheus metrics."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Blueprint, Response

from pulse.app import Runtime, runtime
from pulse.db.errors import CONNECTION_ERRORS_OR_TIMEOUT

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
    listener = rt.hub is not None and rt.hub.listener.connected
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
    listener = rt.hub.listener if rt.hub is not None else None
    by_kind = {kind: rt.limits.by_kind[kind] for kind in STREAM_KINDS}
    last = listener.last_notification_at if listener else None
    return {
        "status": "ok" if listener is not None and listener.connected else "degraded",
        "connections": {"total": sum(by_kind.values()), **by_kind},
        "limits": {
            "max_connections": rt.settings.max_connections,
            "max_connections_per_tenant": rt.settings.max_connections_per_tenant,
            "max_device_filters": rt.settings.max_device_filters,
            "queue_size": rt.settings.queue_size,
        },
        "listener": {
            "connected": bool(listener and listener.connected),
            "channels": listener.channels if listener else 0,
            "last_notification_age_s": None if last is None else round(time.monotonic() - last, 3),
            "reconnects": listener.reconnects if listener else 0,
        },
        "uptime_s": round(time.monotonic() - rt.started_at, 3),
    }


@blueprint.get("/metrics")
async def metrics() -> Response:
    rt = runtime()
    for kind in STREAM_KINDS:
        rt.metrics.connections.labels(kind).set(rt.limits.by_kind[kind])
    if rt.hub is not None:
        rt.metrics.listener_connected.set(1 if rt.hub.listener.connected else 0)
    if rt.pool is not None:
        idle = rt.pool.get_idle_size()
        rt.metrics.db_pool_connections.labels("idle").set(idle)
        rt.metrics.db_pool_connections.labels("in_use").set(rt.pool.get_size() - idle)
    rt.metrics.asyncio_tasks.set(len(asyncio.all_tasks()))
    rt.metrics.python_allocated_blocks.set(sys.getallocatedblocks())
    return Response(generate_latest(rt.metrics.registry), content_type=CONTENT_TYPE_LATEST)


async def _database_answers(rt: Runtime) -> bool:
    if rt.pool is None:
        return False
    try:
        async with asyncio.timeout(2):
            return bool(await rt.pool.fetchval("SELECT 1"))
    except CONNECTION_ERRORS_OR_TIMEOUT:
        return False
