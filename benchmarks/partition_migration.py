"""How long writers wait while migration 0007 partitions an existing telemetry table.

    python -m benchmarks.partition_migration [--rows 1000000] [--writers 4]
                                             [--database-url URL]

A database migrated up to 0006 is filled with ``--rows`` readings (25 devices of
one tenant, two metrics each, received over the last three days). Writers then
commit one reading at a time the way ingest does (ids reserved under the tenant's
lock, one INSERT), each for a tenant of its own, while 0007 runs on another
connection. Printed: the migration's duration, each writer's longest wait for one
commit, and the commits' latency before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg

from benchmarks.harness import Postgres, percentile
from pulse.db.migrate import discover, migrate
from pulse.db.pool import connect


async def fill(conn: asyncpg.Connection, rows: int) -> None:
    await conn.execute("INSERT INTO tenants (tenant_id) VALUES ('tenant-1')")
    async with conn.transaction():
        base = await conn.fetchval("SELECT pulse_reserve_event_ids('tenant-1', $1)", rows)
        await conn.execute(
            """INSERT INTO telemetry (tenant_id, id, device_id, device_time, received_at, metrics)
               SELECT 'tenant-1', $1 + g, 'dev-' || lpad((g % 25)::text, 5, '0'), t, t,
                      jsonb_build_object('temp', round((random() * 30)::numeric, 2),
                                         'hum', round((random() * 80)::numeric, 1))
                 FROM generate_series(1, $2) AS g,
                      LATERAL (SELECT now() - interval '3 days' * (1 - g::float8 / $2)) AS x(t)""",
            base,
            rows,
        )
    await conn.execute("VACUUM ANALYZE telemetry")


async def writer(
    dsn: str, tenant: str, stop: asyncio.Event, out: list[tuple[float, float]]
) -> None:
    conn = await connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant
        )
        while not stop.is_set():
            start = time.perf_counter()
            async with conn.transaction():
                base = await conn.fetchval("SELECT pulse_reserve_event_ids($1, 1)", tenant)
                await conn.execute(
                    """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)
                       VALUES ($1, $2, 'dev-1', now(), '{"temp": 21.5}')""",
                    tenant,
                    base + 1,
                )
            out.append((start, time.perf_counter() - start))
    finally:
        await conn.close()


async def run(rows: int, writers: int, admin_dsn: str | None) -> None:
    async with Postgres(admin_dsn) as pg:
        dsn = await pg.create_database("bench_part")
        conn = await connect(dsn)
        await migrate(conn, [m for m in discover() if m.version < 7])
        t = time.perf_counter()
        await fill(conn, rows)
        print(f"filled {rows:,} rows in {time.perf_counter() - t:.1f} s")

        stop = asyncio.Event()
        samples: list[list[tuple[float, float]]] = [[] for _ in range(writers)]
        tasks = [
            asyncio.create_task(writer(dsn, f"writer-{i}", stop, samples[i]))
            for i in range(writers)
        ]
        await asyncio.sleep(2)
        began = time.perf_counter()
        applied = await migrate(conn)
        ended = time.perf_counter()
        await asyncio.sleep(2)
        stop.set()
        await asyncio.gather(*tasks)
        count = await conn.fetchval("SELECT count(*) FROM telemetry")
        await conn.close()

    print(f"applied {applied}: {ended - began:.3f} s; {count:,} rows after")
    every = [s for w in samples for s in w]
    before = [d for s, d in every if s + d < began]
    after = [d for s, d in every if s > ended]
    during = [d for s, d in every if s < ended and s + d > began]
    print(
        f"commits before: {len(before)}, p50 {percentile(before, 50) * 1e3:.2f} ms, "
        f"p99 {percentile(before, 99) * 1e3:.2f} ms"
    )
    print(
        f"commits after:  {len(after)}, p50 {percentile(after, 50) * 1e3:.2f} ms, "
        f"p99 {percentile(after, 99) * 1e3:.2f} ms"
    )
    print(f"commits overlapping the migration: {len(during)}")
    for i, w in enumerate(samples):
        print(f"writer {i}: longest commit {max(d for _, d in w) * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--database-url", help="an admin DSN (default: an embedded server)")
    args = parser.parse_args()
    asyncio.run(run(args.rows, args.writers, args.database_url))


if __name__ == "__main__":
    main()
