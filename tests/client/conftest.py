from __future__ import annotations

from typing import Any

import asyncpg


async def table_events(pool: asyncpg.Pool, tenant_id: str) -> list[tuple[int, str, dict[str, Any]]]:
    """The tenant's telemetry rows as (id, device_id, metrics), in id order."""
    rows = await pool.fetch(
        "SELECT id, device_id, metrics FROM telemetry WHERE tenant_id = $1 ORDER BY id", tenant_id
    )
    return [(row["id"], row["device_id"], row["metrics"]) for row in rows]
