"""Threshold alert rules: what a tenant defines, and their evaluation inside ingest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field

from pulse.db.database import Database
from pulse.db.queries import load_queries
from pulse.fleet.fields import Name, Text
from pulse.fleet.quota import check_quota, lock_quota
from pulse.ingest.writer import Written
from pulse.times import format_time

Q = load_queries(__package__)

Operator = Literal[">", ">=", "<", "<=", "==", "!="]


class NewRule(BaseModel):
    # Unknown fields are refused, so that a typo is reported rather than ignored.
    model_config = ConfigDict(extra="forbid")

    name: Text = Field(min_length=1, max_length=200)
    metric: Name
    operator: Operator
    # Strict: true and "80" are not thresholds (a boolean metric compares as 1 or 0).
    threshold: float = Field(strict=True, allow_inf_nan=False)
    severity: int = Field(strict=True, ge=1, le=5)
    device_id: Name | None = Field(default=None, description="Omit for every device.")


class UnknownDevice(LookupError):
    """The rule names a device the tenant does not have."""


def rule_json(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "rule_id": row["rule_id"],
        "name": row["name"],
        "metric": row["metric"],
        "operator": row["operator"],
        "threshold": row["threshold"],
        "severity": row["severity"],
        "device_id": row["device_id"],
        "created_at": format_time(row["created_at"]),
    }


async def create_rule(
    db: Database, tenant_id: str, rule: NewRule, *, limit: int | None = None
) -> dict[str, Any]:
    """Create ``rule``; QuotaReached when the tenant has ``limit`` rules."""
    async with db.transaction() as conn:
        if limit is not None:
            await lock_quota(conn, tenant_id)
        await conn.execute(Q["ensure_tenant"], tenant_id)
        row = await conn.fetchrow(
            Q["insert_rule"],
            tenant_id,
            rule.name,
            rule.metric,
            rule.operator,
            rule.threshold,
            rule.severity,
            rule.device_id,
        )
        if row is None:
            raise UnknownDevice(rule.device_id)
        if limit is not None:
            await check_quota(conn, tenant_id, "rules", limit)
    return rule_json(row)


async def list_rules(
    db: Database, tenant_id: str, *, after: int | None = None, limit: int
) -> list[dict[str, Any]]:
    """At most ``limit`` of the tenant's rules, oldest first, after rule ``after`` if given."""
    rows = await db.fetch(Q["list_rules"], tenant_id, after or 0, limit)
    return [rule_json(row) for row in rows]


async def delete_rule(db: Database, tenant_id: str, rule_id: int, subject: str) -> bool:
    """Delete a rule and close its active alerts; False when the tenant has no such rule."""
    async with db.transaction() as conn:
        await conn.execute(Q["lock_tenant_writes"], tenant_id)
        deleted = await conn.fetchval(Q["delete_rule"], tenant_id, rule_id, subject)
    return deleted is not None


async def evaluate_alerts(conn: asyncpg.Connection, written: Written) -> None:
    """The ingest writer's transaction hook: raise, bump and close alerts for what it wrote.

    Rules are evaluated in the write's transaction, so an alert commits with the
    reading that raised it; and a write of a tenant's readings never runs beside
    another of the same tenant (they share the tenant's row lock), so each
    verdict stands until the commit.
    """
    if written.ruled:
        await _apply_rules(conn, written)
    if written.came_online:
        await conn.execute(
            Q["close_no_heartbeat"],
            [tenant for tenant, _ in written.came_online],
            [device for _, device in written.came_online],
        )


async def _apply_rules(conn: asyncpg.Connection, written: Written) -> None:
    verdicts = await conn.fetch(
        Q["evaluate_rules"],
        [
            {"tenant_id": tenant_id, "first_id": rows.first_id, "last_id": rows.last_id}
            for tenant_id, rows in written.rows.items()
            if tenant_id in written.ruled
        ],
    )
    if not verdicts:
        return
    # The values for the alerts' details come from the readings as the devices
    # sent them, which the write still holds.

    def value(row: asyncpg.Record, event_id: str) -> Any:
        if row[event_id] is None:
            return None
        return written.reading(row["tenant_id"], row[event_id]).metrics.get(row["metric"])

    await conn.execute(
        Q["apply_verdicts"],
        [
            {
                "tenant_id": row["tenant_id"],
                "rule_id": row["rule_id"],
                "device_id": row["device_id"],
                "violating": row["last_event_id"] == row["newest_event_id"],
                "triggers": row["triggers"],
                "first_value": value(row, "first_event_id"),
                "first_event_id": row["first_event_id"],
                "last_value": value(row, "last_event_id"),
                "last_event_id": row["last_event_id"],
                "newest_value": value(row, "newest_event_id"),
                "newest_event_id": row["newest_event_id"],
            }
            for row in verdicts
        ],
    )
