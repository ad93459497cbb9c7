"""Where PostgreSQL's time goes under live batch ingest, statement by statement.

    python -m benchmarks.statement_times --database-url URL [--per-gateway 500] [--seconds 15]

``benchmarks.write_costs`` times each statement alone, on one connection; this runs
the real server under the ``ingest-gateways`` load (one tenant, 4 gateways, each
batch 500 readings over the gateway's devices: ``--per-gateway 500`` is a reading
of each of 500 devices, ``--per-gateway 5`` a hundred of each of 5) and reads
``pg_stat_statements`` after: each statement's execution time per stored reading,
with everything the load does to the tables (their growth, dead row versions,
concurrent writers). It also reports the devices table's row updates and how many
were made in place. The server at ``URL`` (an admin URL) needs
``shared_preload_libraries = 'pg_stat_statements'``; for example, PostgreSQL from
Debian's package on a scratch data directory:

    initdb -D /tmp/pgss -A trust -U postgres
    pg_ctl -D /tmp/pgss -o "-p 5499 -k /tmp -c shared_preload_libraries=pg_stat_statements" start
    python -m benchmarks.statement_times --database-url "postgresql://postgres@/postgres?host=/tmp&port=5499"

Times are wall time inside the server (CPU and waits); rows per second and the
server's CPU per reading come with them, as in the scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from urllib.parse import urlsplit

import asyncpg
import orjson

from benchmarks.harness import BackendCpu, Postgres, PulseServer, cpu_meter, provision
from benchmarks.loadgen import post_batches
from benchmarks.scenarios import _reading

TENANT = "tenant-00"
GATEWAYS = 4
BATCH = 500


async def run(admin_dsn: str, per_gateway: int, seconds: float) -> None:
    rng = random.Random(5)
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        async with Postgres(admin_dsn) as pg:
            dsn = await pg.fresh_database()
            database = urlsplit(dsn).path.lstrip("/")
            async with PulseServer(dsn) as server:
                tokens = await provision(server.url, TENANT, GATEWAYS * per_gateway)
                devices = list(tokens.items())

                def bodies(gateway: list[tuple[str, str]]) -> list[bytes]:
                    messages = [
                        {
                            "tenant_id": TENANT,
                            "device_id": device_id,
                            "provision_token": token,
                            "metrics": _reading(rng),
                        }
                        for _ in range(BATCH // len(gateway))
                        for device_id, token in gateway
                    ]
                    return [orjson.dumps({"messages": messages}) for _ in range(4)]

                loads = [
                    bodies(devices[g * per_gateway : (g + 1) * per_gateway])
                    for g in range(GATEWAYS)
                ]
                await admin.execute("SELECT pg_stat_statements_reset()")
                async with BackendCpu(dsn) as backends:
                    with cpu_meter(server.pids()) as cpu:
                        stop = time.perf_counter() + seconds
                        counts = await asyncio.gather(
                            *(post_batches(server.url, load, stop) for load in loads)
                        )
            rows = max(1, sum(counts))
            print(
                f"{GATEWAYS} gateways x {per_gateway} devices: {rows / cpu['wall_s']:,.0f} rows/s, "
                f"server {cpu['others_cpu_s'] / rows * 1e6:.2f} us CPU/row, "
                f"PostgreSQL {backends.seconds / rows * 1e6:.2f} us CPU/row"
            )
            for name, spent in sorted(backends.by_name.items(), key=lambda item: -item[1]):
                print(f"  {name}: {spent / rows * 1e6:.2f} us CPU/row")
            statements = await admin.fetch(
                """SELECT calls, total_exec_time,
                          left(regexp_replace(query, '\\s+', ' ', 'g'), 80) AS query
                     FROM pg_stat_statements
                    WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)
                    ORDER BY total_exec_time DESC LIMIT 8""",
                database,
            )
            print("statement time per stored reading:")
            for s in statements:
                per_row = s["total_exec_time"] * 1e3 / rows
                print(f"  {per_row:6.2f} us  {s['calls']:6d} calls  {s['query']}")
            conn = await asyncpg.connect(dsn)
            try:
                table = await conn.fetchrow(
                    """SELECT n_tup_upd, n_tup_hot_upd, n_dead_tup, n_live_tup,
                              pg_relation_size('devices') AS size
                         FROM pg_stat_user_tables WHERE relname = 'devices'"""
                )
            finally:
                await conn.close()
            print(
                f"devices: {table['n_tup_upd']} row updates, {table['n_tup_hot_upd']} in place; "
                f"{table['n_dead_tup']} dead versions beside {table['n_live_tup']} rows; "
                f"{table['size'] / 1024:.0f} KiB"
            )
    finally:
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", required=True, help="admin URL of the server")
    parser.add_argument("--per-gateway", type=int, default=500, help="devices per gateway")
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    asyncio.run(run(args.database_url, args.per_gateway, args.seconds))


if __name__ == "__main__":
    main()
