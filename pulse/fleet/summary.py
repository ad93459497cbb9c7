"""The fleet summary: one computation for the HTTP route and the v2 WebSocket."""

from __future__ import annotations

from pulse.db.database import Database
from pulse.db.queries import load_queries

Q = load_queries(__package__)


async def fleet_summary(db: Database, tenant_id: str | None) -> dict[str, int]:
    """``{"ONLINE", "STALE", "OFFLINE", "total", "active_alerts"}`` of a tenant, or of
    every tenant when ``tenant_id`` is None (operators)."""
    row = await db.fetchrow(Q["fleet_summary"], tenant_id)
    return {
        "ONLINE": row["online"],
        "STALE": row["stale"],
        "OFFLINE": row["offline"],
        "total": row["total"],
        "active_alerts": row["active_alerts"],
    }
