"""create_app(settings): the Quart app, its routes, and the lifespan that builds the Runtime.

The one composition root: every blueprint and door is registered here, and the
process's Runtime (``pulse.runtime``) is opened when serving starts and closed
when it ends. Handlers find it with ``pulse.web.runtime()``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Any, cast

from quart import Quart, Response, request

from pulse import apidocs, dashboard
from pulse.config import Settings
from pulse.ingest.buffer import MAX_BODY_BYTES
from pulse.runtime import StartupError, open_runtime
from pulse.web import (
    API_HEADERS,
    API_PREFIX,
    RUNTIME,
    devices,
    fleet,
    history,
    ingest,
    legacy_v2,
    openapi,
    ops,
    runtime_of,
    sse,
    telemetry_ws,
    tickets,
)
from pulse.web.errors import JsonRequest, register_error_handlers
from pulse.web.expect import ASK, AskForTheBodyWhenRead, Body
from pulse.web.fastpath import DeviceFastPath
from pulse.web.framing import RefuseAmbiguousLength
from pulse.web.json_bodies import parse_bodies_with_orjson
from pulse.web.routing import PulseQuart
from pulse.web.sse_fastpath import SseFastPath
from pulse.web.ticket_fastpath import TicketFastPath
from pulse.web.websocket import WebSocketRoutes

# Every other route: the largest body they take (a device, an alert rule) is well
# under 1 KiB. Quart holds a body as it arrives, while the JWT is checked and before
# the handler reads it, outside the ingest buffer (PULSE_INGEST_BUFFER_MB): at 1 MiB,
# 200 token holders sending all but the last byte held 200 MB for the body timeout.
MAX_OTHER_BODY_BYTES = 64 * 1024

BLUEPRINTS = (
    ops.blueprint,
    ingest.blueprint,
    devices.blueprint,
    history.blueprint,
    *fleet.BLUEPRINTS,
    sse.blueprint,
    tickets.blueprint,
    dashboard.blueprint,
    apidocs.blueprint,
)


class PulseRequest(JsonRequest):
    """A request whose body may be 1 MiB under /ingest/ and 64 KiB elsewhere: over
    it, 413 payload_too_large, and no more of it is held. A body that waits for
    ``100 Continue`` is asked for when it is read (``pulse.web.expect``)."""

    body_class = Body
    body: Body

    def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
        ingest_route = path.startswith(ingest.INGEST_PREFIX)
        kwargs["max_content_length"] = MAX_BODY_BYTES if ingest_route else MAX_OTHER_BODY_BYTES
        super().__init__(method, scheme, path, *args, **kwargs)
        self.body.ask = cast(Callable[[], None] | None, self.scope.get(ASK))


class PulseApp(PulseQuart):
    def log_exception(
        self,
        exception_info: tuple[type, BaseException, TracebackType] | tuple[None, None, None],
    ) -> None:
        # A StartupError is the operator's one line (pulse serve prints it), not a bug.
        if not isinstance(exception_info[1], StartupError):
            super().log_exception(exception_info)


async def _api_not_stored(response: Response) -> Response:
    """Answers under /api/ carry tenant data: ``API_HEADERS`` (the doors before Quart
    send them too: ``pulse.web.fastpath.send_reply``)."""
    if request.path.startswith(API_PREFIX):
        for name, value in API_HEADERS.items():
            response.headers.setdefault(name, value)
    return response


async def _static_revalidated(response: Response) -> Response:
    """The pages' scripts and styles are asked about again on every load (a 304 when
    unchanged): their names carry no version, and a browser that kept them for Quart's
    default 12 hours mixed an upgrade's modules with the release before."""
    if request.endpoint is not None and request.endpoint.endswith(".static"):
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def create_app(settings: Settings | None = None) -> Quart:
    settings = settings or Settings.from_env()
    settings.check()  # also when an embedding program built the Settings itself
    app = PulseApp("pulse")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    openapi.document_api(app)
    parse_bodies_with_orjson(app)
    register_error_handlers(app)
    app.request_class = PulseRequest
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    app.after_request(_static_revalidated)
    app.after_request(_api_not_stored)
    # A device's readings and heartbeats are answered before Quart, and every ingest
    # body is read within the process's budget (pulse.web.fastpath); SSE streams are
    # opened and stream tickets issued before Quart too (pulse.web.sse_fastpath,
    # pulse.web.ticket_fastpath); before that, a request that states its length twice
    # is refused (pulse.web.framing). Both WebSockets are served from ASGI, without
    # Quart (pulse.web.websocket). Quart asks for a body that waits for 100 Continue
    # only when a handler reads it (pulse.web.expect).
    app.asgi_app = WebSocketRoutes(  # type: ignore[method-assign, assignment]
        app,
        RefuseAmbiguousLength(
            DeviceFastPath(
                app, SseFastPath(app, TicketFastPath(app, AskForTheBodyWhenRead(app.asgi_app)))
            )
        ),
        {
            telemetry_ws.URL: telemetry_ws.telemetry_websocket,
            legacy_v2.URL: legacy_v2.legacy_websocket,
        },
    )

    @app.while_serving
    async def lifespan() -> AsyncGenerator[None, None]:
        async with open_runtime(settings) as runtime:
            app.extensions[RUNTIME] = runtime
            yield

    return app


def drain(app: Quart) -> None:
    """Shutting down: end every stream now (clients resume elsewhere) and refuse new ones."""
    if RUNTIME in app.extensions:
        runtime_of(app).drain()
