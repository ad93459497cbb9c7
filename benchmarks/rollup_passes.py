"""The rollups' passes under live ingest, with the rollups' pages full or with room.

    python -m benchmarks.rollup_passes [--passes 24] [--database-url URL]

Two fresh databases (the embedded PostgreSQL unless ``--database-url``), one with
``telemetry_rollups`` at fillfactor 100 (as before migration 0010), one as migrated.
Each pass commits 30,000 readings of 2,000 devices (two metrics each, every device 15
times, in the same minute for four passes) and runs the rollups' statement over them,
as a pass of ``pulse.history.rollups`` does under a fleet's gateways: each pass
updates every (device, metric)'s minute, 15 minutes and hour again. The two
databases take the passes in turns; each statement is timed by its backend's CPU
(``/proc/PID/task/*/schedstat``). What it answers: how much an update in place
("HOT": no new index entry, no new page) saves the rollups (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import asyncpg

from benchmarks.harness import Postgres, cpu_ns
from pulse.db.pool import connect
from pulse.history.rollups import Q

DEVICES = 2000
PER_DEVICE = 15  # readings per device per pass
WARMUP = 4  # passes left out of the median: the buckets' first rows


async def one_pass(conn: asyncpg.Connection, pid: int, n: int) -> float:
    """Commit one pass's readings, then roll them up; the statement's CPU in ms."""
    first, count = n * DEVICES * PER_DEVICE, DEVICES * PER_DEVICE
    await conn.execute(
        """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)
           SELECT 't1', $1::bigint + g, 'dev-' || (g % $2::int),
                  timestamptz '2026-12-05 10:00' + ($3::int / 4) * interval '1 minute'
                      + (g % 50) * interval '20 milliseconds',
                  jsonb_build_object('temp', g % 100, 'hum', g % 37)
             FROM generate_series(1, $4::int) AS g""",
        first,
        DEVICES,
        n,
        count,
    )
    newest = first + count
    await conn.execute("UPDATE tenants SET last_event_id = $1 WHERE tenant_id = 't1'", newest)
    before = cpu_ns(pid)
    async with conn.transaction():
        await conn.execute(Q["roll_up"], "t1", first, first + count)
    return (cpu_ns(pid) - before) / 1e6


async def run(passes: int, database_url: str | None) -> None:
    async with Postgres(database_url) as pg:
        variants: dict[str, tuple[asyncpg.Connection, int, list[float]]] = {}
        for name in ("fillfactor 100 (before 0010)", "fillfactor 70 (migrated)"):
            conn = await connect(await pg.fresh_database())
            if name.startswith("fillfactor 100"):
                await conn.execute("ALTER TABLE telemetry_rollups RESET (fillfactor)")
            await conn.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            variants[name] = (conn, pid, [])
        for n in range(passes):
            order = list(variants.values())
            for conn, pid, spent in order if n % 2 == 0 else reversed(order):
                spent.append(await one_pass(conn, pid, n))
        print(f"{'rollups table':30s} | pass CPU (median) | per reading | HOT updates | size")
        for name, (conn, _, spent) in variants.items():
            await conn.execute("SELECT pg_stat_force_next_flush()")
            stats = await conn.fetchrow(
                """SELECT n_tup_upd, n_tup_hot_upd, pg_relation_size('telemetry_rollups') AS size
                     FROM pg_stat_user_tables WHERE relname = 'telemetry_rollups'"""
            )
            median = statistics.median(spent[WARMUP:])
            hot = stats["n_tup_hot_upd"] / max(1, stats["n_tup_upd"])
            print(
                f"{name:30s} | {median:10.1f} ms | {median * 1000 / (DEVICES * PER_DEVICE):7.2f} µs"
                f" | {hot:10.0%} | {stats['size'] / 2**20:5.1f} MiB"
            )
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=24)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    asyncio.run(run(args.passes, args.database_url))


if __name__ == "__main__":
    main()
