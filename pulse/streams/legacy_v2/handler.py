"""WS /api/v2/ws: the thin I/O layer that drives the v2 protocol Session (CONTRACT 5.3).

Telemetry of the subscribed devices comes from the hub as it commits; the
hub's change signals (NOTIFY kinds ``devices`` and ``alerts``, per tenant or
on the global channel for the operators' placeholder context) trigger the
alerts and fleet summary pushes. Nothing is polled but the periodic summary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any, cast

from quart import Blueprint, current_app, websocket

from pulse.app import Runtime, runtime
from pulse.auth.http import authenticate_request, request_tenant
from pulse.bus.events import TelemetryEvent
from pulse.bus.subscription import Closing, Filters, Lagging, Subscription
from pulse.db.shared import SharedReads
from pulse.fleet.alerts import active_alerts
from pulse.fleet.summary import fleet_summary
from pulse.streams.legacy_v2.protocol import (
    SIGNALS,
    Effect,
    PushAlerts,
    PushFleetSummary,
    Reply,
    Session,
)
from pulse.streams.websocket import (
    LAGGING,
    SERVER_RESTARTING,
    UNAUTHORIZED,
    Close,
    Connection,
    serve_websocket,
)

blueprint = Blueprint("legacy_v2", __name__)

# The hub topic of the operators' placeholder context: the global channel.
ALL_TENANTS = "*"
# Not a NOTIFY kind: how the reader wakes the pump when a subscription changed
# the schedule (a fleet subscription starts the periodic summaries).
RESCHEDULE = "reschedule"
ALERTS_LIMIT = 100
_READS = "pulse.legacy_v2.reads"


@blueprint.websocket("/api/v2/ws")
async def legacy_websocket() -> None:
    await serve_websocket("legacy_v2", _serve, headers={"Deprecation": "true"})


async def _serve(connection: Connection) -> None:
    rt = runtime()
    principal = await authenticate_request(allow_query=True)
    if principal.is_operator and not websocket.args.get("tenant_id"):
        tenant_id = None  # the seed's placeholder context: every tenant, no devices
    else:
        tenant_id = request_tenant(principal)
    session = Session(
        tenant_id,
        keepalive_s=rt.settings.ws_keepalive_s,
        max_devices=rt.settings.max_device_filters,
    )
    topic = tenant_id or ALL_TENANTS
    async with (
        rt.limits.hold("legacy_v2", topic),
        rt.hub.subscribe(
            topic,
            Filters(device_ids=frozenset()),
            kind="legacy_v2",
            signals=SIGNALS | {RESCHEDULE},
        ) as subscription,
    ):
        pushes = _Pushes(rt, connection, subscription, tenant_id)
        expires_at = principal.expires_at.timestamp()
        subscription.drop_unread = connection.drop_unread
        subscription.deliver_now = lambda events: (
            time.time() < expires_at and connection.write_now(_encode(events))
        )
        await connection.run(
            _pump(connection, session, subscription, pushes, expires_at),
            _read(connection, session, subscription, pushes),
        )


@dataclasses.dataclass(frozen=True)
class _Reads:
    """The pushes' queries, shared by the connections of a process that ask at once:
    a change signals every connection of the tenant in the same instant."""

    alerts: SharedReads[str | None, list[dict[str, Any]]]
    summaries: SharedReads[str | None, dict[str, int]]

    @staticmethod
    def of(rt: Runtime) -> _Reads:
        reads = current_app.extensions.get(_READS)
        if reads is None:
            reads = current_app.extensions[_READS] = _Reads(
                alerts=SharedReads(lambda tenant: active_alerts(rt.pool, tenant, ALERTS_LIMIT)),
                summaries=SharedReads(lambda tenant: fleet_summary(rt.pool, tenant)),
            )
        return cast(_Reads, reads)


class _Pushes:
    """Carries out the effects that read the database, for the reader and the pump alike."""

    def __init__(
        self, rt: Runtime, connection: Connection, subscription: Subscription, tenant_id: str | None
    ) -> None:
        self.reads = _Reads.of(rt)
        self.connection = connection
        self.subscription = subscription
        self.tenant_id = tenant_id
        self.last_summary: dict[str, int] | None = None

    async def carry_out(self, effects: list[Effect]) -> None:
        # Whatever is read is at least as fresh as the last change signalled;
        # a later change is signalled, and pushed, again.
        since = self.subscription.signalled_at
        for effect in effects:
            if isinstance(effect, Reply):
                self.connection.reply(effect.message)
            elif isinstance(effect, PushAlerts):
                alerts = await self.reads.alerts.get(self.tenant_id, since)
                self.connection.reply({"type": "alerts", "alerts": alerts})
            elif isinstance(effect, PushFleetSummary):
                summary = await self.reads.summaries.get(self.tenant_id, since)
                if effect.only_if_changed and summary == self.last_summary:
                    continue
                self.last_summary = summary
                self.connection.reply({"type": "fleet_summary", "data": summary})


async def _read(
    connection: Connection, session: Session, subscription: Subscription, pushes: _Pushes
) -> None:
    while True:
        data = await connection.receive()
        due = session.next_due()
        effects = session.receive(data, time.monotonic())
        if subscription.filters.device_ids != session.devices:
            subscription.set_filters(Filters(device_ids=session.devices))
        if session.next_due() != due:
            subscription.notify(RESCHEDULE)
        await pushes.carry_out(effects)


async def _pump(
    connection: Connection,
    session: Session,
    subscription: Subscription,
    pushes: _Pushes,
    expires_at: float,
) -> None:
    """Telemetry as it arrives, pushes on change signals, summaries on schedule, and the
    end of the connection at the token's expiry."""
    # The hub cancels a lagging subscription's owner when it stays stuck writing
    # to its client: that is this task, not the handler that subscribed.
    subscription.owner = asyncio.current_task()
    while True:
        now = time.monotonic()
        until_expiry = expires_at - time.time()
        if until_expiry <= 0:
            raise Close(UNAUTHORIZED, "token_expired")
        due = session.next_due()
        timeout = until_expiry if due is None else min(until_expiry, max(0.0, due - now))
        await subscription.wait(timeout)
        try:
            events = subscription.take()
        except Lagging:
            raise Close(LAGGING, "lagging") from None
        except Closing:
            raise Close(SERVER_RESTARTING, "server_restarting") from None
        await connection.send_many(_encode(events))
        signals = subscription.take_signals()
        await pushes.carry_out(session.signals(signals) + session.due(time.monotonic()))


def _encode(events: list[TelemetryEvent]) -> list[bytes]:
    encoded = [event.encode() for event in events]
    return [data for data in encoded if data is not None]
