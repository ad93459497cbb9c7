"""The legacy v2 WebSocket protocol (CONTRACT 5.3 and the seed), without I/O.

A ``Session`` takes what happens to a connection (a client's frame, the hub's
change signals, the passing of time) and answers with effects for the handler
to carry out: replies to send, pushes that need a read of the database (the
alerts snapshot, the fleet summary), and keepalives. Time comes in as ``now``
(monotonic seconds), so the schedule is tested without waiting.

The schedule: every ``keepalive_s`` (PULSE_WS_KEEPALIVE_S), the seed's "periodic
update" keeps the connection alive: the fleet summary for a ``fleet`` subscriber,
a WebSocket ping frame for every other connection (no v2 message fits them: a
device's telemetry and the alerts are sent when they change, and a quiet tenant
would leave such a connection silent for longer than a proxy's idle timeout).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pulse.names import is_valid_name
from pulse.streams.messages import BadMessage, action_of, decode, error, shown

DEVICE_ID_REQUIRED = "device_id required for device subscription"
DEVICE_ID_REQUIRED_TO_UNSUBSCRIBE = "device_id required for device unsubscription"
TENANT_REQUIRED = (
    "Device subscriptions need a tenant: operators reconnect with ?tenant_id=<tenant>."
)
CHANNELS = ("device", "alerts", "fleet")
# What the hub tells a v2 connection besides telemetry (NOTIFY kinds).
SIGNALS = frozenset({"devices", "alerts"})
# Fleet summaries pushed because something changed: at most one per this interval.
CHANGE_INTERVAL_S = 1.0


@dataclasses.dataclass(frozen=True)
class Reply:
    message: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class PushAlerts:
    """Send ``{"type": "alerts", "alerts": [<active alerts, newest first, at most 100>]}``."""


@dataclasses.dataclass(frozen=True)
class PushFleetSummary:
    """Send ``{"type": "fleet_summary", "data": {...}}``; when ``only_if_changed``, skip it
    if it equals the last one sent."""

    only_if_changed: bool = False


@dataclasses.dataclass(frozen=True)
class KeepAlive:
    """Send a WebSocket ping frame (no JSON: a v2 page never sees it)."""


Effect = Reply | PushAlerts | PushFleetSummary | KeepAlive


class Session:
    """One v2 connection's subscriptions and schedule.

    ``tenant_id`` is None in the operators' placeholder context: alerts and
    fleet across every tenant, and no device subscriptions.
    """

    def __init__(
        self,
        tenant_id: str | None,
        *,
        keepalive_s: float,
        max_devices: int,
        change_interval_s: float = CHANGE_INTERVAL_S,
        now: float = 0.0,
    ) -> None:
        self.tenant_id = tenant_id
        self.keepalive_s = keepalive_s
        self.max_devices = max_devices
        self.change_interval_s = change_interval_s
        self.devices: frozenset[str] = frozenset()
        self.alerts = False
        self.fleet = False
        self._next_periodic = now + keepalive_s  # now: when the connection opened
        self._change_pending = False
        self._last_change_push = float("-inf")

    # -- inputs ----------------------------------------------------------------

    def receive(self, data: str | bytes, now: float) -> list[Effect]:
        """A client's frame."""
        try:
            message = decode(data)
            action = action_of(message, ("subscribe", "unsubscribe"))
            channel = message.get("type")
            if channel not in CHANNELS:
                raise BadMessage(
                    f"Unknown subscription type {shown(channel)}; use device, alerts or fleet."
                )
            if action == "subscribe":
                return self._subscribe(str(channel), message, now)
            return self._unsubscribe(str(channel), message)
        except BadMessage as exc:
            return [Reply(error(str(exc)))]

    def signals(self, kinds: set[str]) -> list[Effect]:
        """The hub says the tenant's devices or alerts changed."""
        effects: list[Effect] = []
        if "alerts" in kinds and self.alerts:
            effects.append(PushAlerts())
        if kinds & SIGNALS and self.fleet:
            self._change_pending = True
        return effects

    def due(self, now: float) -> list[Effect]:
        """What the passing of time asks for: the periodic summary or keepalive, or a
        throttled change."""
        periodic = now >= self._next_periodic
        if periodic:
            while self._next_periodic <= now:
                self._next_periodic += self.keepalive_s
        if not self.fleet:
            return [KeepAlive()] if periodic else []
        change = self._change_pending and now >= self._last_change_push + self.change_interval_s
        if change:
            self._change_pending = False
            self._last_change_push = now
        if periodic or change:
            return [PushFleetSummary(only_if_changed=not periodic)]
        return []

    def next_due(self) -> float:
        """When ``due`` has something next (monotonic seconds)."""
        if self.fleet and self._change_pending:
            return min(self._next_periodic, self._last_change_push + self.change_interval_s)
        return self._next_periodic

    # -- actions ---------------------------------------------------------------

    def _subscribe(self, channel: str, message: dict[str, Any], now: float) -> list[Effect]:
        if channel == "device":
            device_id = self._device_id(message, DEVICE_ID_REQUIRED)
            if device_id not in self.devices and len(self.devices) >= self.max_devices:
                raise BadMessage(f"At most {self.max_devices} device subscriptions per connection.")
            self.devices = self.devices | {device_id}
            return [Reply({"type": "subscribed", "channel": "device", "device_id": device_id})]
        reply = Reply({"type": "subscribed", "channel": channel})
        if channel == "alerts":
            self.alerts = True
            return [reply, PushAlerts()]
        self.fleet = True
        self._next_periodic = now + self.keepalive_s
        self._change_pending = False
        return [reply, PushFleetSummary()]

    def _unsubscribe(self, channel: str, message: dict[str, Any]) -> list[Effect]:
        if channel == "device":
            device_id = self._device_id(message, DEVICE_ID_REQUIRED_TO_UNSUBSCRIBE)
            self.devices = self.devices - {device_id}
            return [Reply({"type": "unsubscribed", "channel": "device", "device_id": device_id})]
        if channel == "alerts":
            self.alerts = False
        else:
            self.fleet = False
            self._change_pending = False
        return [Reply({"type": "unsubscribed", "channel": channel})]

    def _device_id(self, message: dict[str, Any], missing: str) -> str:
        device_id = message.get("device_id")
        if device_id is None or device_id == "":
            raise BadMessage(missing)
        if not is_valid_name(device_id):
            raise BadMessage(
                f"The device id {shown(device_id)} is not 1 to 64 characters of [A-Za-z0-9_.:-]."
            )
        if self.tenant_id is None:
            raise BadMessage(TENANT_REQUIRED)
        return str(device_id)
