"""Alerts: their one JSON shape, the lists, and the lifecycle OPEN -> ACKNOWLEDGED -> CLOSED."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import (
    Any,
    Literal,
    NotRequired,  # pydantic reads these on 3.11
)

from typing_extensions import TypedDict

from pulse.db.database import Database
from pulse.db.queries import load_queries
from pulse.times import format_time

Q = load_queries(__package__)

OPEN = "OPEN"
ACKNOWLEDGED = "ACKNOWLEDGED"
CLOSED = "CLOSED"
ACTIVE = (OPEN, ACKNOWLEDGED)
# The values of the list's ``status`` parameter.
STATUS_FILTERS: dict[str, tuple[str, ...]] = {
    "active": ACTIVE,
    OPEN: (OPEN,),
    ACKNOWLEDGED: (ACKNOWLEDGED,),
    CLOSED: (CLOSED,),
}

Action = Literal["acknowledge", "close"]


class UnknownAlert(LookupError):
    """No such alert in the tenant (another tenant's alert included)."""


class AlertClosed(Exception):
    """A closed alert cannot be acknowledged."""


def next_status(status: str, action: Action) -> str:
    """Where ``action`` takes an alert in ``status``. Repeating an action changes nothing:
    a second acknowledge keeps who acknowledged first, a second close who closed."""
    if action == "close":
        return CLOSED
    if status == CLOSED:
        raise AlertClosed("The alert is closed; it can no longer be acknowledged.")
    return ACKNOWLEDGED


class AlertJson(TypedDict):
    """An alert, as every route and the v2 WebSocket send it."""

    alert_id: int
    device_id: str
    alert_type: Literal["THRESHOLD", "NO_HEARTBEAT"]
    severity: int
    status: Literal["OPEN", "ACKNOWLEDGED", "CLOSED"]
    summary: str
    details: dict[str, Any]
    created_at: str
    updated_at: str
    tenant_id: NotRequired[str]  # only in cross-tenant views


def alert_json(row: Mapping[str, Any], *, with_tenant: bool = False) -> AlertJson:
    """The contract's alert; ``with_tenant`` adds ``tenant_id`` for cross-tenant views."""
    details = {
        **row["details"],
        "trigger_count": row["trigger_count"],
        "last_triggered_at": format_time(row["last_triggered_at"]),
        "acknowledged_by": row["acknowledged_by"],
        "acknowledged_at": _time(row["acknowledged_at"]),
        "closed_by": row["closed_by"],
        "closed_at": _time(row["closed_at"]),
        "closed_reason": row["closed_reason"],
    }
    alert: AlertJson = {
        "alert_id": row["alert_id"],
        "device_id": row["device_id"],
        "alert_type": row["alert_type"],
        "severity": row["severity"],
        "status": row["status"],
        "summary": row["summary"],
        "details": details,
        "created_at": format_time(row["created_at"]),
        "updated_at": format_time(row["updated_at"]),
    }
    if with_tenant:
        alert["tenant_id"] = row["tenant_id"]
    return alert


async def list_alerts(
    db: Database,
    tenant_id: str | None,
    statuses: Sequence[str],
    *,
    before: int | None = None,
    limit: int = 100,
) -> list[AlertJson]:
    """Alerts with one of ``statuses``, newest first, older than alert ``before`` if given;
    every tenant's when ``tenant_id`` is None."""
    rows = await db.fetch(Q["list_alerts"], tenant_id, list(statuses), before, limit)
    return [alert_json(row, with_tenant=tenant_id is None) for row in rows]


async def active_alerts(db: Database, tenant_id: str | None, limit: int = 100) -> list[AlertJson]:
    """OPEN and ACKNOWLEDGED alerts, newest first (what the v2 WebSocket pushes)."""
    return await list_alerts(db, tenant_id, ACTIVE, limit=limit)


async def change_alert(
    db: Database, tenant_id: str, alert_id: int, action: Action, subject: str
) -> AlertJson:
    """Acknowledge or close an alert of ``tenant_id`` as ``subject``; the alert afterwards."""
    async with db.transaction() as conn:
        row = await conn.fetchrow(Q["lock_alert"], tenant_id, alert_id)
        if row is None:
            raise UnknownAlert(alert_id)
        if next_status(row["status"], action) != row["status"]:
            query = "acknowledge_alert" if action == "acknowledge" else "close_alert"
            row = await conn.fetchrow(Q[query], alert_id, subject)
    return alert_json(row)


def _time(moment: Any) -> str | None:
    return None if moment is None else format_time(moment)
