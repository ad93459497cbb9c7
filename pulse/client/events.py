"""The typed events the client yields, parsed from the wire shapes of CONTRACT sections 2 and 4."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Any, Literal


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@dataclasses.dataclass(frozen=True, slots=True)
class Telemetry:
    """One stored reading: ``id`` is the tenant's event id, increasing in commit order."""

    id: int
    device_id: str
    time: datetime
    metrics: dict[str, float | bool]

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Telemetry:
        data = message["data"]
        return cls(
            id=int(message["id"]),
            device_id=str(message["device_id"]),
            time=parse_time(data["time"]),
            metrics=dict(data["metrics"]),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Alert:
    alert_id: int | str
    device_id: str | None
    alert_type: str
    severity: int
    status: Literal["OPEN", "ACKNOWLEDGED", "CLOSED"]
    summary: str
    details: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    tenant_id: str | None = None  # in an operator's view of every tenant

    @classmethod
    def from_wire(cls, alert: dict[str, Any]) -> Alert:
        return cls(
            alert_id=alert["alert_id"],
            device_id=alert.get("device_id"),
            alert_type=alert["alert_type"],
            severity=int(alert["severity"]),
            status=alert["status"],
            summary=alert.get("summary") or "",
            details=dict(alert.get("details") or {}),
            created_at=parse_time(alert["created_at"]),
            updated_at=parse_time(alert["updated_at"]),
            tenant_id=alert.get("tenant_id"),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class AlertsUpdate:
    """The tenant's active alerts, newest first (at most 100), pushed whenever they change."""

    alerts: list[Alert]

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> AlertsUpdate:
        return cls([Alert.from_wire(a) for a in message.get("alerts") or []])


@dataclasses.dataclass(frozen=True, slots=True)
class FleetSummary:
    online: int
    stale: int
    offline: int
    total: int
    active_alerts: int

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> FleetSummary:
        return cls(
            online=int(data["ONLINE"]),
            stale=int(data["STALE"]),
            offline=int(data["OFFLINE"]),
            total=int(data["total"]),
            active_alerts=int(data["active_alerts"]),
        )


V2Event = Telemetry | AlertsUpdate | FleetSummary

NoticeKind = Literal["connected", "disconnected", "reset", "lagging", "token_refreshed", "error"]


@dataclasses.dataclass(frozen=True, slots=True)
class Notice:
    """What happened to the connection (for logs and status lines), never data.

    ``retry_in_s`` is set on ``disconnected``: how long until the next attempt.
    """

    kind: NoticeKind
    detail: str = ""
    retry_in_s: float | None = None
