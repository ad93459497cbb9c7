"""WS /api/v1/customer/telemetry/stream: the telemetry stream over a WebSocket (CONTRACT 5.1).

The same replay-then-live core as SSE (TelemetryStream), plus a client that
talks back: it changes its filters, refreshes its token and pings while the
events flow. A reader task handles its messages while the writer streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import UTC, datetime
from typing import Any

from quart import Blueprint, websocket

from pulse.app import runtime
from pulse.auth.access import tenant_for
from pulse.auth.errors import AuthError, BadRequest, Forbidden
from pulse.auth.http import authenticate_request, request_tenant
from pulse.bus.events import TelemetryEvent
from pulse.bus.subscription import Filters
from pulse.streams.messages import BadMessage, action_of, decode, error, name_list
from pulse.streams.params import BadParameter, parse_event_id, parse_filters
from pulse.streams.telemetry import End, Idle, Reset, Started, TelemetryStream
from pulse.streams.websocket import BAD_REQUEST, END_CLOSES, Close, Connection, serve_websocket
from pulse.times import format_time

blueprint = Blueprint("telemetry_ws", __name__)

ACTIONS = ("subscribe", "unsubscribe", "set_metrics", "clear_filters", "auth", "ping")


# -- the protocol: what a client's message does to the filters, and the reply --


@dataclasses.dataclass(frozen=True)
class Reauthenticate:
    """An ``auth`` action: the token has to be verified before there is a reply."""

    token: str


def handle_action(
    filters: Filters, message: dict[str, Any], *, max_device_filters: int
) -> tuple[Filters, dict[str, Any]] | Reauthenticate:
    """The filters after ``message`` and the reply to it; BadMessage for anything else."""
    action = action_of(message, ACTIONS)
    if action == "ping":
        return filters, {"type": "pong"}
    if action == "clear_filters":
        return Filters(), {"type": "filters_cleared"}
    if action == "auth":
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise BadMessage("auth needs token: a JWT for the same tenant.")
        return Reauthenticate(token)
    if action == "set_metrics":
        if not isinstance(message.get("metrics"), list):
            raise BadMessage("set_metrics needs metrics: a list of metric names, [] for all.")
        metrics = name_list(message, "metrics", what="metric name")
        updated = dataclasses.replace(filters, metrics=frozenset(metrics) or None)
        return updated, {"type": "metrics_updated", "metrics": metrics}
    device_ids = name_list(message, "device_ids", single="device_id", what="device id")
    if not device_ids:
        raise BadMessage(f"{action} needs device_id or device_ids.")
    current = filters.device_ids
    if action == "subscribe":
        # From "every device", subscribing narrows the stream to the devices named.
        wanted = (current or frozenset()).union(device_ids)
        if len(wanted) > max_device_filters:
            raise BadMessage(
                f"At most {max_device_filters} device ids can be filtered on one connection."
            )
        return dataclasses.replace(filters, device_ids=wanted), {
            "type": "subscribed",
            "device_ids": device_ids,
        }
    if current is None:
        raise BadMessage(
            "This connection streams every device: subscribe to devices by id first "
            "(unsubscribing cannot mean every device but some)."
        )
    # Removing the last device leaves an empty set: no device, not every device.
    return dataclasses.replace(filters, device_ids=current.difference(device_ids)), {
        "type": "unsubscribed",
        "device_ids": device_ids,
    }


def connected_message(tenant_id: str, filters: Filters, newest_id: int) -> dict[str, Any]:
    return {
        "type": "connected",
        "tenant_id": tenant_id,
        "filters": {
            "device_ids": sorted(filters.device_ids or ()),
            "metrics": sorted(filters.metrics or ()),
        },
        "last_event_id": newest_id,
    }


# -- the handler ---------------------------------------------------------------


@blueprint.websocket("/api/v1/customer/telemetry/stream")
async def telemetry_websocket() -> None:
    await serve_websocket("websocket", _serve)


async def _serve(connection: Connection) -> None:
    rt = runtime()
    principal = await authenticate_request(allow_query=True)
    tenant_id = request_tenant(principal)
    try:
        filters = parse_filters(websocket.args, max_device_filters=rt.settings.max_device_filters)
        last_event_id = parse_event_id(websocket.args.get("last_event_id"))
    except BadParameter:
        raise Close(BAD_REQUEST, "invalid_parameter") from None
    async with rt.limits.hold("websocket", tenant_id):
        stream = TelemetryStream(
            rt.hub,
            rt.store,
            tenant_id,
            filters,
            kind="websocket",
            last_event_id=last_event_id,
            idle_s=rt.settings.ws_ping_s,
            expires_at=principal.expires_at.timestamp(),
        )
        stream.write_now = lambda events: connection.write_now(_encode(events, stream))
        stream.drop_unread = connection.drop_unread
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await connection.run(
            _write(connection, stream, started), _read(connection, stream, started)
        )


async def _write(
    connection: Connection, stream: TelemetryStream, started: asyncio.Future[None]
) -> None:
    # Closed here, not whenever the collector gets to it: closing it ends the
    # subscription, which otherwise keeps taking events for a gone client.
    async with contextlib.aclosing(stream.items()) as items:
        async for item in items:
            if isinstance(item, list):
                await connection.send_many(_encode(item, stream))
            elif isinstance(item, Started):
                await connection.send(
                    connected_message(stream.tenant_id, stream.filters, item.newest_id)
                )
                if not started.done():
                    started.set_result(None)
            elif isinstance(item, Idle):
                # The newest id passed, sent or filtered out: a filtered client
                # resumes from here without replaying what it skipped.
                now = format_time(datetime.now(UTC))
                await connection.send({"type": "ping", "time": now, "last_event_id": item.position})
            elif isinstance(item, Reset):
                await connection.send({"type": "reset", **item.data})
            elif isinstance(item, End):
                raise Close(*END_CLOSES[item.reason])


def _encode(events: list[TelemetryEvent], stream: TelemetryStream) -> list[bytes]:
    metrics = stream.filters.metrics
    encoded = [event.encode(metrics) for event in events]
    return [data for data in encoded if data is not None]


async def _read(
    connection: Connection, stream: TelemetryStream, started: asyncio.Future[None]
) -> None:
    # Replies come after the `connected` message, which is always the first.
    await started
    max_device_filters = runtime().settings.max_device_filters
    while True:
        data = await connection.receive()
        try:
            outcome = handle_action(
                stream.filters, decode(data), max_device_filters=max_device_filters
            )
            if isinstance(outcome, Reauthenticate):
                reply = await _reauthenticate(stream, outcome.token)
            else:
                filters, reply = outcome
                if filters != stream.filters:
                    stream.set_filters(filters)
        except BadMessage as exc:
            reply = error(str(exc))
        connection.reply(reply)


async def _reauthenticate(stream: TelemetryStream, token: str) -> dict[str, Any]:
    """A fresh token for the same tenant moves the connection's expiry."""
    try:
        principal = await runtime().verifier.verify(token)
        tenant_id = tenant_for(principal, websocket.args.get("tenant_id"))
    except (AuthError, Forbidden, BadRequest) as exc:
        raise BadMessage(f"auth refused: {exc.detail}") from None
    if tenant_id != stream.tenant_id:
        raise BadMessage("auth refused: the token is for another tenant.")
    stream.expires_at = principal.expires_at.timestamp()
    return {"type": "auth_ok", "expires_at": format_time(principal.expires_at)}
