"""WS /api/v1/customer/telemetry/stream: the telemetry stream over a WebSocket (CONTRACT 5.1).

The same replay-then-live loop as SSE (pulse.streams.live), plus a client that
talks back: it changes its filters, refreshes its token and pings while the
events flow. A reader task handles its messages while the writer streams.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

from pulse.auth.access import require_unexpired, tenant_for
from pulse.auth.principal import Principal
from pulse.bus.events import encoded
from pulse.errors import INVALID_PARAMETER, ApiError
from pulse.runtime import Runtime
from pulse.streams.live import End, Idle, Live, Reset, Started
from pulse.streams.messages import BadMessage, decode, error
from pulse.streams.params import BadParameter, parse_event_id, parse_filters
from pulse.streams.telemetry_protocol import Reauthenticate, connected_message, handle_action
from pulse.times import format_time
from pulse.web.websocket import Close, Connection, Socket, frames, serve_websocket

URL = "/api/v1/customer/telemetry/stream"


async def telemetry_websocket(rt: Runtime, socket: Socket) -> None:
    await serve_websocket(rt, socket, "websocket", _serve)


async def _serve(connection: Connection) -> None:
    rt, args = connection.rt, connection.socket.args
    # Parameters first: a request refused for them does not spend its ticket.
    try:
        filters = parse_filters(args, max_device_filters=rt.settings.max_device_filters)
        last_event_id = parse_event_id(args.get("last_event_id"))
    except BadParameter:
        raise Close.of(INVALID_PARAMETER) from None

    def tenant(principal: Principal) -> str:
        return tenant_for(principal, args.get("tenant_id"))

    principal = await connection.authenticate(tenant)
    tenant_id = tenant(principal)
    stream = Live(
        rt.hub,
        rt.store,
        tenant_id,
        filters,
        kind="websocket",
        last_event_id=last_event_id,
        announces_start=True,  # "connected" carries the tenant's newest committed id
        idle_s=lambda: rt.settings.ws_ping_s,
        expires_at=principal.expires_at.timestamp(),
        output=connection.direct,
        frame=frames,
    )
    async with rt.limits.hold("websocket", tenant_id, end=stream.end):
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await connection.run(
            _write(connection, stream, started), _read(connection, stream, started)
        )


async def _write(connection: Connection, stream: Live, started: asyncio.Future[None]) -> None:
    # Closed here, not whenever the collector gets to it: closing it ends the
    # subscription, which otherwise keeps taking events for a gone client.
    async with contextlib.aclosing(stream.items()) as items:
        async for item in items:
            if isinstance(item, list):
                await connection.send_many(encoded(item, stream.filters.metrics))
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
                raise Close.of(item.error)


async def _read(connection: Connection, stream: Live, started: asyncio.Future[None]) -> None:
    # Replies come after the `connected` message, which is always the first.
    await started
    max_device_filters = connection.rt.settings.max_device_filters
    while True:
        data = await connection.receive()
        try:
            outcome = handle_action(
                stream.filters, decode(data), max_device_filters=max_device_filters
            )
            if isinstance(outcome, Reauthenticate):
                reply = await _reauthenticate(connection, stream, outcome.token)
            else:
                filters, reply = outcome
                if filters != stream.filters:
                    stream.set_filters(filters)
        except BadMessage as exc:
            reply = error(str(exc))
        connection.reply(reply)


async def _reauthenticate(connection: Connection, stream: Live, token: str) -> dict[str, Any]:
    """A fresh token for the same tenant moves the connection's expiry."""
    try:
        principal = await connection.rt.verifier.verify(token)
        # Within the verifier's leeway a token past its exp passes; taken, it would close
        # the connection at once. Refused, the connection keeps the expiry it has.
        require_unexpired(principal)
        tenant_id = tenant_for(principal, connection.socket.args.get("tenant_id"))
    except ApiError as exc:
        raise BadMessage(f"auth refused: {exc.detail}") from None
    if tenant_id != stream.tenant_id:
        raise BadMessage("auth refused: the token is for another tenant.")
    stream.expires_at = principal.expires_at.timestamp()
    return {"type": "auth_ok", "expires_at": format_time(principal.expires_at)}
