"""The token check looks each device up by its key, however large the fleet."""

from __future__ import annotations

import asyncpg

from pulse.ingest.writer import Q


async def test_the_token_check_probes_the_key_in_a_large_fleet(pool: asyncpg.Pool) -> None:
    """The query's JSON hides how many devices it names (the planner guesses 1000):
    joined plainly, a table this size was read whole for a batch of 50 devices."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1'), ('t2')")
    await pool.execute(
        """INSERT INTO devices (tenant_id, device_id, token_hash)
           SELECT 't' || (1 + i % 2), 'dev-' || i, sha256(i::text::bytea)
             FROM generate_series(1, 50000) AS i"""
    )
    await pool.execute("ANALYZE devices")
    asked = [{"t": "t1", "o": 0, "d": [f"dev-{i}" for i in range(2, 101, 2)]}]  # t1's: even
    async with pool.acquire() as conn:
        # As a prepared statement is planned after a few runs: for any parameters.
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) " + Q["device_token_hashes"], asked, 1.0)
        rows = await conn.fetch(Q["device_token_hashes"], asked, 1.0)
        await conn.execute("RESET plan_cache_mode")
    scans = _scans(plan[0]["Plan"])  # json, decoded by the pool's codec
    assert ("devices", "Index Scan") in scans or ("devices", "Index Only Scan") in scans, scans
    assert ("devices", "Seq Scan") not in scans, scans
    assert sorted(row["i"] for row in rows) == list(range(50))


def _scans(node: dict[str, object]) -> list[tuple[object, object]]:
    found = [(node.get("Relation Name"), node["Node Type"])] if "Relation Name" in node else []
    for child in node.get("Plans", []):  # type: ignore[union-attr]
        found += _scans(child)
    return found
