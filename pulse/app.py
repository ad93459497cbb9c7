"""create_app(settings): the Quart app, its extensions, blueprints and lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import cast

import asyncpg
from quart import Quart, current_app
from quart_schema import QuartSchema

from pulse.auth.tokens import TokenVerifier
from pulse.bus.hub import Hub
from pulse.bus.store import EventStore
from pulse.config import Settings
from pulse.db.embedded import embedded_postgres
from pulse.db.migrate import migrate
from pulse.db.pool import connect, create_pool
from pulse.db.retention import run_retention
from pulse.errors import register_error_handlers
from pulse.ops.metrics import Metrics
from pulse.streams.limits import ConnectionLimits
from pulse.supervisor import Supervisor

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024


@dataclasses.dataclass
class Runtime:
    """What a running process owns; built at startup, torn down at shutdown."""

    settings: Settings
    metrics: Metrics
    verifier: TokenVerifier
    supervisor: Supervisor
    started_at: float
    limits: ConnectionLimits
    draining: bool = False
    dsn: str = ""
    pool: asyncpg.Pool = None  # type: ignore[assignment]
    store: EventStore = None  # type: ignore[assignment]
    hub: Hub = None  # type: ignore[assignment]


def runtime() -> Runtime:
    return cast(Runtime, current_app.extensions["pulse"])


def shutdown_trigger(app: Quart, stop: asyncio.Event) -> Callable[[], Awaitable[None]]:
    """For hypercorn's ``shutdown_trigger``: when ``stop`` is set, end every stream first.

    Hypercorn then stops accepting, lets in-flight requests (ingest) finish
    within its graceful timeout, and runs the app's shutdown.
    """

    async def trigger() -> None:
        await stop.wait()
        rt = cast(Runtime, app.extensions["pulse"])
        rt.draining = True
        if rt.hub is not None:
            rt.hub.drain()

    return trigger


def create_app(settings: Settings | None = None) -> Quart:
    settings = settings or Settings.from_env()
    app = Quart("pulse")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    QuartSchema(
        app,
        info={"title": "Pulse", "version": "1"},  # type: ignore[arg-type]
        openapi_path="/openapi.json",
        swagger_ui_path="/docs",
        redoc_ui_path=None,
        scalar_ui_path=None,
    )
    register_error_handlers(app)
    rt = Runtime(
        settings=settings,
        metrics=Metrics(),
        verifier=TokenVerifier.from_settings(settings),
        supervisor=Supervisor(),
        started_at=time.monotonic(),
        limits=ConnectionLimits(
            settings.max_connections,
            settings.max_connections_per_tenant,
            ttl_s=settings.connection_lease_ttl_s,
        ),
    )
    app.extensions["pulse"] = rt
    exit_stack = contextlib.AsyncExitStack()

    from pulse.fleet.devices import blueprint as devices_bp
    from pulse.ingest.routes import blueprint as ingest_bp
    from pulse.ops.routes import blueprint as ops_bp
    from pulse.streams.legacy_v2.handler import blueprint as legacy_v2_bp
    from pulse.streams.sse import blueprint as sse_bp
    from pulse.streams.stream_ticket import blueprint as stream_ticket_bp
    from pulse.streams.telemetry_ws import blueprint as telemetry_ws_bp
    from pulse.streams.websocket import WebsocketConnection

    app.asgi_websocket_class = WebsocketConnection

    for bp in (
        ops_bp,
        ingest_bp,
        devices_bp,
        sse_bp,
        telemetry_ws_bp,
        legacy_v2_bp,
        stream_ticket_bp,
    ):
        app.register_blueprint(bp)

    from pulse.dashboard import blueprint as dashboard_bp

    app.register_blueprint(dashboard_bp)

    from pulse.ingest.fastpath import DeviceFastPath

    app.asgi_app = DeviceFastPath(app, app.asgi_app)  # type: ignore[method-assign]

    @app.before_serving
    async def _start() -> None:
        await exit_stack.__aenter__()
        rt.dsn = settings.database_url or await _start_embedded(exit_stack, settings)
        rt.pool = await create_pool(rt.dsn, max_size=settings.db_pool_size)
        exit_stack.push_async_callback(rt.pool.close)
        rt.store = EventStore(rt.pool)
        rt.hub = Hub(
            rt.store,
            rt.dsn,
            rt.metrics,
            queue_size=settings.queue_size,
            backoff_max_s=settings.listener_backoff_max_s,
        )
        exit_stack.push_async_callback(rt.hub.close)
        await rt.limits.start(rt.pool)
        exit_stack.push_async_callback(rt.limits.stop)
        rt.supervisor.start("listener", rt.hub.listener.run)
        rt.supervisor.start("connection-leases", rt.limits.keep_alive)
        rt.supervisor.start(
            "retention",
            lambda: run_retention(rt.pool, settings.retention_hours, settings.retention_interval_s),
        )
        exit_stack.push_async_callback(rt.supervisor.stop)

    @app.after_serving
    async def _stop() -> None:
        await exit_stack.aclose()

    # Fleet status and alerts; after _start, because its startup needs the pool.
    from pulse.fleet.routes import install as install_fleet

    install_fleet(app)
    return app


async def _start_embedded(stack: contextlib.AsyncExitStack, settings: Settings) -> str:
    loop = asyncio.get_running_loop()
    cm = embedded_postgres(settings.data_dir)
    dsn = await loop.run_in_executor(None, cm.__enter__)
    stack.push_async_callback(loop.run_in_executor, None, cm.__exit__, None, None, None)
    conn = await connect(dsn)
    try:
        applied = await migrate(conn)
        if applied:
            log.info("embedded database migrated: %s", ", ".join(applied))
    finally:
        await conn.close()
    return dsn
