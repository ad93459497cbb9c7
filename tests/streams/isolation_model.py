"""The pure model behind test_isolation_property.py: what each stream connection must receive.

No I/O here. A connection is described by its tenant, the position it starts after, the
position it ended at (None while open) and a timeline of views: ``(boundary, view)`` means
"for events with an id above ``boundary``, until the next entry, these are the filters".
Given the tenant's stored rows, ``Connection.expected`` is the exact list of events the
connection must have received, in id order, each once, shaped as the contract's event
(metrics cut down to the metric filter; an event left with no metric is not sent).

Also here: the filter algebra of both WebSockets' actions (with the replies they must get)
and the token claims the generated identities are minted from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Transport = Literal["sse", "ws", "v2"]

# Device ids are drawn from one shared pool, so tenants collide on them on purpose.
DEVICES = ("d1", "d2", "d3")
# Ids nobody has: subscribing to them must be accepted and deliver nothing.
GHOST_DEVICE = "ghost-9"
METRICS = ("temp", "hum", "volt")
# A device only v2 clients subscribe to at the end: its reading, the last one the tenant
# gets, proves that everything queued for the v2 connection before it has been pushed.
MARKER_DEVICE = "zz-marker"
MARKER_METRIC = "mark"

CUSTOMER, TENANT_ADMIN, OPERATOR, OPERATOR_ADMIN = (
    "customer",
    "tenant-admin",
    "operator",
    "operator-admin",
)
ROLES = (CUSTOMER, TENANT_ADMIN, OPERATOR, OPERATOR_ADMIN)
OPERATOR_ROLES = frozenset({OPERATOR, OPERATOR_ADMIN})
# Where a non-operator token names its tenant (CONTRACT section 1).
CLAIM_SHAPES = (
    "tenant_id",
    "organization",
    "organization_list",
    "organization_dict",
    "organization_over_tenant_id",
    "realm_access",
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One telemetry row. ``time`` is None for what the driver wrote (it learns the stored
    time only from the table)."""

    tenant: str
    id: int
    device_id: str
    metrics: Mapping[str, Any]
    time: str | None = None


@dataclasses.dataclass(frozen=True)
class View:
    """A connection's filters. ``devices``: None is every device, an empty set is none;
    ``metrics``: None is every metric."""

    devices: frozenset[str] | None = None
    metrics: frozenset[str] | None = None

    def event(self, row: Row) -> dict[str, Any] | None:
        """The event this view sends for ``row``, or None when it sends nothing."""
        if self.devices is not None and row.device_id not in self.devices:
            return None
        metrics = dict(row.metrics)
        if self.metrics is not None:
            metrics = {k: v for k, v in metrics.items() if k in self.metrics}
        if not metrics:
            return None
        return {
            "type": "telemetry",
            "id": row.id,
            "device_id": row.device_id,
            "data": {"time": row.time, "metrics": metrics},
        }

    def query(self) -> dict[str, str]:
        """The view as the streams' query parameters (only what a URL can say)."""
        params = {}
        if self.devices:
            params["device_id"] = ",".join(sorted(self.devices))
        if self.metrics:
            params["metric"] = ",".join(sorted(self.metrics))
        return params

    def as_in_url(self) -> View:
        """What the server makes of ``query()``: an empty device set cannot be written in a
        URL, and an absent filter is every device."""
        return View(self.devices or None, self.metrics or None)


NO_DEVICE = View(devices=frozenset())


@dataclasses.dataclass
class Connection:
    """One connection of one client, and everything it received."""

    tenant: str
    transport: Transport
    start: int  # events with an id above this
    views: list[tuple[int, View]]
    end: int | None = None  # the last id it is accountable for (None: open, or to the end)
    received: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    resets: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    expected_reset: dict[str, Any] | None = None

    def change_view(self, boundary: int, view: View) -> None:
        self.views.append((boundary, view))

    def view_for(self, event_id: int) -> View:
        current = self.views[0][1]
        for boundary, view in self.views:
            if boundary < event_id:
                current = view
        return current

    def covers(self, event_id: int) -> bool:
        return event_id > self.start and (self.end is None or event_id <= self.end)

    def expected(self, rows: Sequence[Row]) -> list[dict[str, Any]]:
        """Every event of ``rows`` (the tenant's, in id order) this connection must get."""
        events = []
        for row in rows:
            if row.tenant == self.tenant and self.covers(row.id):
                event = self.view_for(row.id).event(row)
                if event is not None:
                    events.append(event)
        return events

    def expected_ids(self, rows: Sequence[Row]) -> list[int]:
        return [e["id"] for e in self.expected(rows)]

    def received_ids(self) -> list[int]:
        return [int(e.get("id", -1)) for e in self.received]


# -- the telemetry WebSocket's and the v2 WebSocket's filter actions -------------------


def unique(names: Sequence[str]) -> list[str]:
    """Each name once, in the order sent (how replies echo them)."""
    return list(dict.fromkeys(names))


def ws_action(view: View, action: str, names: Sequence[str]) -> tuple[View, dict[str, Any] | None]:
    """The view after a telemetry WebSocket action and the reply it gets (None: an error)."""
    if action == "clear_filters":
        return View(), {"type": "filters_cleared"}
    if action == "set_metrics":
        return dataclasses.replace(view, metrics=frozenset(names) or None), {
            "type": "metrics_updated",
            "metrics": unique(names),
        }
    if action == "subscribe":
        devices = (view.devices or frozenset()) | frozenset(names)
        return dataclasses.replace(view, devices=devices), {
            "type": "subscribed",
            "device_ids": unique(names),
        }
    assert action == "unsubscribe", action
    if view.devices is None:
        return view, None  # a connection streaming every device cannot unsubscribe one
    return dataclasses.replace(view, devices=view.devices - frozenset(names)), {
        "type": "unsubscribed",
        "device_ids": unique(names),
    }


def v2_action(view: View, action: str, device_id: str) -> tuple[View, dict[str, Any]]:
    """The v2 device set after ``subscribe``/``unsubscribe`` and the reply."""
    devices = view.devices or frozenset()
    devices = devices | {device_id} if action == "subscribe" else devices - {device_id}
    reply_type = "subscribed" if action == "subscribe" else "unsubscribed"
    return View(devices=devices), {"type": reply_type, "channel": "device", "device_id": device_id}


# -- identities ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Claims:
    tenant_id: str | None
    roles: tuple[str, ...]
    extra: dict[str, Any]
    query_tenant: str | None  # the tenant_id query parameter the client must send


def claims_for(
    role: str, shape: str, tenant: str, decoy: str, *, name_tenant: bool = False
) -> Claims:
    """A token that acts for ``tenant``; ``decoy`` (another tenant) is planted wherever the
    contract says it must be ignored: an operator's own tenant claim, a ``tenant_id`` claim
    next to ``organization``, the later entries of an ``organization`` list or dict."""
    roles: tuple[str, ...] = (role,)
    extra: dict[str, Any] = {}
    if shape == "realm_access":
        # The known role only in realm_access; an unknown role at the top level.
        roles, extra["realm_access"] = ("viewer",), {"roles": [role]}
    if role in OPERATOR_ROLES:
        return Claims(decoy, roles, extra, query_tenant=tenant)
    query_tenant = tenant if name_tenant else None
    if shape in ("tenant_id", "realm_access"):
        return Claims(tenant, roles, extra, query_tenant)
    if shape == "organization":
        extra["organization"] = tenant
    elif shape == "organization_list":
        extra["organization"] = ["", tenant, decoy]
    elif shape == "organization_dict":
        extra["organization"] = {tenant: {"id": "x"}, decoy: {"id": "y"}}
    else:
        assert shape == "organization_over_tenant_id", shape
        extra["organization"] = tenant
        return Claims(decoy, roles, extra, query_tenant)
    return Claims(None, roles, extra, query_tenant)
