"""What PostgreSQL's backends are doing under live batch ingest, sampled.

    python -m benchmarks.activity [--clients 4] [--seconds 12] [--typical] [--database-url URL]

The ``ingest`` scenario's load (one tenant, 20 devices, ``--clients`` clients
posting batches of 500 readings) against Pulse, or the typical stack with
``--typical``, while another connection reads ``pg_stat_activity`` every few
milliseconds. Each line is the share of samples in which some backend of the
database was in that state: running a statement (``active``, with what it waits
for), or inside a transaction waiting for its client's next statement (``idle in
transaction``, after the statement named). The second kind is time a write holds
its locks while the server's event loop is elsewhere. Then the number of
backends running at once. What it answers: is PostgreSQL busy, and when it is
not, what is it waiting for (docs/performance.md, "Where one tenant's write
waits").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import time

import asyncpg

from benchmarks.harness import Postgres, PulseServer, TypicalServer, provision
from benchmarks.scenarios import _batch_bodies, _measure_batches

TENANT = "tenant-00"
SAMPLE_S = 0.003
QUERY_HEAD = 40


async def sample(dsn: str, stop: float) -> tuple[int, collections.Counter[str]]:
    """Sample the database's client backends until ``stop``: how many samples, and in
    how many of them each state was seen (and each count of running backends)."""
    seen: collections.Counter[str] = collections.Counter()
    samples = 0
    conn = await asyncpg.connect(dsn)
    try:
        while time.perf_counter() < stop:
            rows = await conn.fetch(
                """SELECT state, wait_event_type || '/' || wait_event AS waits,
                          left(query, $1) AS query
                     FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid()
                      AND backend_type = 'client backend' AND state <> 'idle'""",
                QUERY_HEAD,
            )
            samples += 1
            states = {
                " ".join(
                    part
                    for part in (r["state"], r["waits"] if r["state"] == "active" else None)
                    if part
                )
                + f" {r['query']!r}"
                for r in rows
            }
            seen.update(states)
            seen[f"{sum(r['state'] == 'active' for r in rows)} running at once"] += 1
            await asyncio.sleep(SAMPLE_S)
    finally:
        await conn.close()
    return samples, seen


async def run(clients: int, seconds: float, typical: bool, database_url: str | None) -> None:
    async with Postgres(database_url) as pg:
        dsn = await pg.fresh_database()
        async with TypicalServer(dsn) if typical else PulseServer(dsn) as server:
            if typical:  # it takes any token
                devices = {TENANT: {f"dev-{i:04d}": "-" for i in range(20)}}
            else:
                devices = {TENANT: await provision(server.url, TENANT, 20)}
            load = _batch_bodies(random.Random(1), devices, 500)
            stop = time.perf_counter() + seconds
            sampling = asyncio.create_task(sample(dsn, stop))
            rate = (await _measure_batches(server, dsn, [load] * clients, seconds))[0]
            samples, seen = await sampling
    print(f"{'typical stack' if typical else 'Pulse'}: {rate:,.0f} rows/s, {samples} samples")
    for state, count in sorted(seen.items(), key=lambda item: -item[1]):
        if count / samples >= 0.005:
            print(f"{100 * count / samples:6.1f}%  {state}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--typical", action="store_true", help="the typical stack instead")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    asyncio.run(run(args.clients, args.seconds, args.typical, args.database_url))


if __name__ == "__main__":
    main()
