"""Readings committed with chosen device times, the way ingest commits them."""

from __future__ import annotations

from datetime import datetime

import asyncpg


async def many_readings(
    pool: asyncpg.Pool, tenant: str, device: str, n: int, start: datetime
) -> None:
    """n readings of a device with four metrics, one a second from ``start``, in one
    statement (ids 1 to n: the tenant must have none yet)."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
    await pool.execute(
        """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)
           SELECT $1, g, $2, $3::timestamptz + g * interval '1 second',
                  jsonb_build_object('a', g, 'b', g, 'c', g, 'd', g)
             FROM generate_series(1, $4) AS g""",
        tenant,
        device,
        start,
        n,
    )
    await pool.execute("UPDATE tenants SET last_event_id = $2 WHERE tenant_id = $1", tenant, n)


async def readings_at(
    pool: asyncpg.Pool, tenant: str, rows: list[tuple[str, datetime, dict[str, float]]]
) -> list[int]:
    """Commit readings with these device times in one transaction; return their ids."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
    async with pool.acquire() as conn, conn.transaction():
        base = await conn.fetchval("SELECT pulse_reserve_event_ids($1, $2)", tenant, len(rows))
        await conn.executemany(
            """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)
               VALUES ($1, $2, $3, $4, $5)""",
            [(tenant, base + n, d, t, m) for n, (d, t, m) in enumerate(rows, 1)],
        )
    return list(range(base + 1, base + 1 + len(rows)))
