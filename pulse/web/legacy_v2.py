"""WS /api/v2/ws: the thin I/O layer that drives the v2 protocol Session (CONTRACT 5.3).

Telemetry of the subscribed devices comes from the live loop as it commits; the
hub's change signals (``devices`` and ``alerts``, per tenant or, for the
operators' placeholder context, for every tenant) trigger the alerts and fleet
summary pushes. Nothing is polled but the periodic summary; connections without
a fleet subscription get a ping frame on that schedule instead (the keepalive).
"""

from __future__ import annotations

import time

from pulse.auth.access import tenant_for
from pulse.auth.principal import Principal
from pulse.bus.events import encoded
from pulse.bus.subscription import Filters
from pulse.errors import INVALID_PARAMETER
from pulse.runtime import Runtime
from pulse.streams.legacy_v2.protocol import (
    SIGNALS,
    Effect,
    KeepAlive,
    PushAlerts,
    PushFleetSummary,
    Reply,
    Session,
)
from pulse.streams.legacy_v2.reads import FleetReads
from pulse.streams.live import End, Live, Signals
from pulse.web.websocket import Close, Connection, Socket, frames, serve_websocket

URL = "/api/v2/ws"

# The hub topic of the operators' placeholder context (every tenant's changes).
ALL_TENANTS = "*"
# Not a change kind: how the reader wakes the pump when a subscription changed
# the schedule (a fleet subscription restarts it, with a summary in place of the ping).
RESCHEDULE = "reschedule"


async def legacy_websocket(rt: Runtime, socket: Socket) -> None:
    await serve_websocket(rt, socket, "legacy_v2", _serve, headers={"Deprecation": "true"})


async def _serve(connection: Connection) -> None:
    rt, args = connection.rt, connection.socket.args
    # v2 does not resume: a last_event_id is refused, or its client would believe it
    # had (before the credential: a ticket is not spent). Any other parameter is
    # ignored, as v2 always did: existing dashboards may send their own (a cache
    # buster, a client name).
    if "last_event_id" in args:
        raise Close.of(INVALID_PARAMETER)

    def tenant(principal: Principal) -> str | None:
        """The tenant acted on; None: the seed's placeholder context of an operator
        without tenant_id (every tenant, no devices)."""
        if principal.is_operator and not args.get("tenant_id"):
            return None
        return tenant_for(principal, args.get("tenant_id"))

    principal = await connection.authenticate(tenant)
    tenant_id = tenant(principal)
    session = Session(
        tenant_id,
        keepalive_s=rt.settings.ws_keepalive_s,
        max_devices=rt.settings.max_device_filters,
        now=time.monotonic(),
    )
    topic = tenant_id or ALL_TENANTS

    def until_due() -> float:
        return max(0.0, session.next_due() - time.monotonic())

    stream = Live(
        rt.hub,
        rt.store,
        topic,
        Filters(device_ids=frozenset()),
        kind="legacy_v2",
        replay=False,
        signals=SIGNALS | {RESCHEDULE},
        idle_s=until_due,
        idle_is_silence=False,  # the pushes are due whatever was sent
        expires_at=principal.expires_at.timestamp(),
        output=connection.direct,
        frame=frames,
    )
    pushes = _Pushes(rt.fleet_reads, connection, stream)
    async with rt.limits.hold("legacy_v2", topic, end=stream.end):
        await connection.run(
            _pump(connection, session, stream, pushes), _read(connection, session, stream, pushes)
        )


class _Pushes:
    """Carries out the effects that read the database, for the reader and the pump alike."""

    def __init__(self, reads: FleetReads, connection: Connection, stream: Live) -> None:
        self.reads = reads
        self.connection = connection
        self.stream = stream
        self.last_summary: dict[str, int] | None = None

    async def carry_out(self, effects: list[Effect]) -> None:
        # Whatever is read is at least as fresh as the last change signalled;
        # a later change is signalled, and pushed, again.
        subscription = self.stream.subscription
        assert subscription is not None, "effects come once the stream is subscribed"
        since = subscription.signalled_at
        tenant_id = None if self.stream.tenant_id == ALL_TENANTS else self.stream.tenant_id
        for effect in effects:
            if isinstance(effect, Reply):
                self.connection.reply(effect.message)
            elif isinstance(effect, PushAlerts):
                alerts = await self.reads.alerts.get(tenant_id, since)
                self.connection.reply({"type": "alerts", "alerts": alerts})
            elif isinstance(effect, PushFleetSummary):
                summary = await self.reads.summaries.get(tenant_id, since)
                if effect.only_if_changed and summary == self.last_summary:
                    continue
                self.last_summary = summary
                self.connection.reply({"type": "fleet_summary", "data": summary})
            elif isinstance(effect, KeepAlive):
                await self.connection.ping()


async def _read(connection: Connection, session: Session, stream: Live, pushes: _Pushes) -> None:
    # Replies come once the subscription is open: what commits after a reply is sent.
    await stream.subscribed.wait()
    subscription = stream.subscription
    assert subscription is not None
    while True:
        data = await connection.receive()
        due = session.next_due()
        effects = session.receive(data, time.monotonic())
        if stream.filters.device_ids != session.devices:
            stream.set_filters(Filters(device_ids=session.devices))
        if session.next_due() != due:
            subscription.notify(RESCHEDULE)
        await pushes.carry_out(effects)


async def _pump(connection: Connection, session: Session, stream: Live, pushes: _Pushes) -> None:
    """Telemetry as it arrives, pushes on change signals, summaries on schedule, and the
    end of the connection at the token's expiry."""
    async for item in stream.items():
        if isinstance(item, End):
            raise Close.of(item.error)
        kinds: set[str] = set()
        if isinstance(item, list):
            await connection.send_many(encoded(item))
        elif isinstance(item, Signals):
            kinds = set(item.kinds)
        await pushes.carry_out(session.signals(kinds) + session.due(time.monotonic()))
