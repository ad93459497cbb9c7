"""GET /api/v1/customer/telemetry/stream/sse: Server-Sent Events with exact resume."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import orjson
from pydantic import BaseModel, Field
from quart import Blueprint, Response, request
from quart_schema import document_headers, document_querystring, security_scheme, tag

from pulse.auth.access import require_unexpired
from pulse.auth.principal import Principal
from pulse.bus.events import TelemetryEvent
from pulse.bus.subscription import Filters
from pulse.db.errors import DatabaseUnavailable
from pulse.errors import (
    CONNECTION_LIMIT,
    DATABASE_UNAVAILABLE,
    INVALID_PARAMETER,
    LAGGING,
    ApiError,
)
from pulse.runtime import Runtime
from pulse.streams.limits import LimitReached
from pulse.streams.live import End, Idle, Live, Reset, Started
from pulse.streams.params import BadParameter, parse_event_id, parse_filters
from pulse.web import openapi, runtime
from pulse.web.asgi import query_args
from pulse.web.auth import authenticate_request, request_tenant
from pulse.web.direct import CHUNKS, DirectWrites, direct_writes

log = logging.getLogger(__name__)
blueprint = Blueprint("sse", __name__)

SSE_URL = "/api/v1/customer/telemetry/stream/sse"
RETRY_MS = 2000
# A stream refused once its head was out, or ended by the tenant's limit (after its
# process's lease lapsed and other processes filled the limit meanwhile).
LIMIT_REACHED_EVENT = b'event: error\ndata: {"reason":"connection_limit"}\n\n'
HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Accel-Buffering": "no",
}


class StreamQuery(BaseModel):
    device_id: str | None = Field(
        default=None, description="Comma-separated device ids; without it, every device."
    )
    metric: str | None = Field(
        default=None,
        description="Comma-separated metric names: events carry only these, and an event "
        "with none of them is not sent.",
    )
    last_event_id: int | None = Field(
        default=None, description="Resume after this event id (the header wins)."
    )
    tenant_id: str | None = Field(default=None, description="Required for operators.")
    ticket: str | None = Field(
        default=None,
        description="A one-time stream ticket (POST /api/v1/stream-ticket): the way for "
        "an EventSource, which cannot send headers.",
    )
    token: str | None = Field(
        default=None,
        description="The JWT, where no header can carry it (it ends up in access logs "
        "of proxies: prefer a ticket).",
    )


class StreamHeaders(BaseModel):
    last_event_id: int | None = Field(
        default=None,
        description="Resume after this event id; EventSource sends it by itself on reconnect.",
    )


_EXAMPLE = (
    "retry: 2000\n\n"
    'id: 124\ndata: {"type":"telemetry","id":124,"device_id":"dev-0001",'
    '"data":{"time":"2026-11-27T17:00:00.000Z","metrics":{"temp":21.5}}}\n\n'
    ": keepalive\n\n"
)


@blueprint.get(SSE_URL)
@tag(["streams"])
@security_scheme(openapi.STREAM_AUTH)
@document_querystring(StreamQuery)
@document_headers(StreamHeaders)
@openapi.answers(
    200,
    "An endless event stream: `retry:`, then each event as `id:` and `data:`, and "
    "`event: reset`, `event: heartbeat`, `event: lagging` and `: keepalive` as "
    "docs/protocol.md says.",
    "text/event-stream",
    _EXAMPLE,
)
@openapi.errors(*openapi.STREAM, INVALID_PARAMETER, CONNECTION_LIMIT)
async def telemetry_sse() -> Response:
    """Live telemetry as Server-Sent Events, resumable from an event id."""
    rt = runtime()
    # Parameters first: a request refused for them does not spend its ticket.
    args = query_args(request.query_string)  # as the fast path reads them
    try:
        filters = parse_filters(args, max_device_filters=rt.settings.max_device_filters)
        last_event_id = parse_event_id(
            request.headers.get("Last-Event-ID") or args.get("last_event_id")
        )
    except BadParameter as exc:
        raise ApiError(INVALID_PARAMETER, str(exc)) from exc
    if rt.draining:
        raise shutting_down()
    principal = await authenticate_request(allow_query=True, accept=_accept)
    tenant_id = request_tenant(principal)
    try:
        await rt.limits.check(tenant_id)
    except LimitReached as exc:
        raise limit_reached(exc) from exc
    stream, writes = await open_stream(
        rt, principal, tenant_id, filters, last_event_id, scope=request.scope
    )
    response = Response(body(rt, stream, writes), status=200, headers=HEADERS)
    response.timeout = None  # a stream has no response deadline
    return response


def shutting_down() -> ApiError:
    """The 503 of a stream asked of a process that is shutting down: before its
    credential is checked, so that a ticket stays unspent for the next process."""
    return ApiError(
        DATABASE_UNAVAILABLE,
        "The server is shutting down; reconnect and resume.",
        {"Retry-After": str(RETRY_MS // 1000)},
    )


def _accept(principal: Principal) -> None:
    require_unexpired(principal)
    request_tenant(principal)


def limit_reached(exc: LimitReached) -> ApiError:
    """The 429 of a stream refused for the connection limit."""
    return ApiError(CONNECTION_LIMIT, str(exc), {"Retry-After": "5"})


async def open_stream(
    rt: Runtime,
    principal: Principal,
    tenant_id: str,
    filters: Filters,
    last_event_id: int | None,
    *,
    scope: Mapping[str, Any],
) -> tuple[Live, DirectWrites | None]:
    """The stream of an admitted request, and the direct writes its chunks go by (if any).

    Its start is taken here, before the response head: a client that has the head
    misses nothing committed after it (docs/protocol.md, "Resuming")."""
    writes = direct_writes(scope, CHUNKS, enabled=rt.settings.direct_writes)
    stream = Live(
        rt.hub,
        rt.store,
        tenant_id,
        filters,
        kind="sse",
        last_event_id=last_event_id,
        idle_s=lambda: rt.settings.sse_keepalive_s,
        expires_at=principal.expires_at.timestamp(),
        output=writes,
        frame=sse_chunk,
    )
    await stream.begin()
    return stream, writes


async def body(
    rt: Runtime, stream: Live, writes: DirectWrites | None
) -> AsyncGenerator[bytes, None]:
    """The Quart route's response body: the stream's chunks while it holds its slot,
    taken once the head is out. (The fast path, ``pulse.web.sse_fastpath``, takes it
    before the head, so that a refusal is a 429 or a 503 rather than this.)"""
    try:
        async with (
            rt.limits.hold("sse", stream.tenant_id, end=stream.end),
            contextlib.aclosing(chunks(stream, writes)) as held,
        ):
            async for chunk in held:
                yield chunk
    except LimitReached:
        # Lost a race for the last slot between the check and the start of the body.
        yield LIMIT_REACHED_EVENT
    except DatabaseUnavailable as exc:
        # The client reconnects after `retry` and resumes from its last id.
        log.warning("ending an SSE stream: %s", exc)


async def chunks(stream: Live, writes: DirectWrites | None) -> AsyncGenerator[bytes, None]:
    """``retry:``, then the stream's chunks, of a stream that holds its slot."""
    # The first chunk goes the ASGI way: once it is out, the response
    # has started and further chunks may be written directly.
    yield b"retry: %d\n\n" % RETRY_MS
    try:
        async with contextlib.aclosing(_frames(stream)) as frames:
            async for chunk in frames:
                if writes is None:
                    yield chunk
                else:
                    await writes.send(chunk)
    except DatabaseUnavailable as exc:
        # The client reconnects after `retry` and resumes from its last id.
        log.warning("ending an SSE stream: %s", exc)


async def _frames(stream: Live) -> AsyncGenerator[bytes, None]:
    metrics = stream.filters.metrics
    last_sent = stream.last_event_id
    # Closed here, not whenever the collector gets to it: closing it ends the
    # subscription, which otherwise keeps taking events for a gone client.
    async with contextlib.aclosing(stream.items()) as items:
        async for item in items:
            if isinstance(item, list):
                yield sse_chunk(item, metrics)
                last_sent = item[-1].id
            elif isinstance(item, Started):
                if last_sent is None:
                    # A live stream's resume point from the start: a block with an id
                    # and no data sets EventSource.lastEventId without an event (WHATWG
                    # HTML, "dispatch the event"), so a client that drops before the
                    # first event resumes from here instead of missing what came between.
                    yield b"id: %d\n\n" % item.newest_id
                    last_sent = item.newest_id
            elif isinstance(item, Idle):
                if last_sent is not None and stream.written_now > last_sent:
                    last_sent = stream.written_now  # live events the hub wrote straight out
                if last_sent is None or item.position > last_sent:
                    # Filtered-out events passed by: give the client a newer resume point.
                    yield b"event: heartbeat\nid: %d\ndata: {}\n\n" % item.position
                    last_sent = item.position
                else:
                    yield b": keepalive\n\n"
            elif isinstance(item, Reset):
                if item.data["reason"] == "unknown_position":
                    # The stream goes on live from the tenant's newest id: the reset
                    # carries it as its id, or an EventSource that dropped before the
                    # next event would come back with the position refused, and be
                    # told to start from a newer newest id, missing what came between.
                    last_sent = item.data["last_event_id"]
                    yield b"event: reset\nid: %d\ndata: %s\n\n" % (
                        last_sent,
                        orjson.dumps(item.data),
                    )
                else:
                    yield b"event: reset\ndata: %s\n\n" % orjson.dumps(item.data)
            elif isinstance(item, End):
                if item.error is LAGGING:
                    yield b'event: lagging\ndata: {"reason":"lagging"}\n\n'
                elif item.error is CONNECTION_LIMIT:
                    yield LIMIT_REACHED_EVENT
                return


def sse_chunk(events: list[TelemetryEvent], metrics: frozenset[str] | None) -> bytes:
    """Several events in one write: ``id:`` and ``data:`` lines, a blank line after each."""
    parts = []
    for event in events:
        data = event.encode(metrics)
        if data is not None:
            parts.append(b"id: %d\ndata: %s\n\n" % (event.id, data))
    return b"".join(parts)
