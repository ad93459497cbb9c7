"""Whether a writer stopped amid its writes answers each one truly.

    python -m benchmarks.stop_answers [--runs 60] [--database-url URL]

Each run: a fresh database, one device, 400 single-reading writes started 0.5 ms
apart through one ``TelemetryWriter`` (group commit), and ``stop`` called once between
the 200th and the 300th, as a server's shutdown does a second before its timeout.
Every write is then compared with the table: a 503 (DatabaseUnavailable) whose reading
is stored would make a client's retry store it twice; a 201 whose reading is missing
would be a loss. A correctness probe, not a timing: its figures are counts
(docs/operations.md, "Shutdown and rolling deploys").
"""

from __future__ import annotations

import argparse
import asyncio
import random
from datetime import UTC, datetime

from benchmarks.harness import Postgres
from pulse.auth.device_tokens import new_device_token
from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.pool import create_pool
from pulse.ingest.model import Submission
from pulse.ingest.validation import Reading
from pulse.ingest.writer import TelemetryWriter

WRITES = 400


async def one_run(dsn: str, rng: random.Random) -> tuple[int, int, int]:
    """(answered 503 yet stored, answered 201 yet missing, answered 503)."""
    pool = await create_pool(dsn, max_size=10)
    try:
        token, token_hash = new_device_token()
        await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
        await pool.execute(
            "INSERT INTO devices (tenant_id, device_id, token_hash) VALUES ('t1', 'd1', $1)",
            token_hash,
        )
        writer = TelemetryWriter(Database(pool, dsn))
        now = datetime.now(UTC)

        async def write(value: int) -> bool:
            reading = Reading(now, {"v": float(value)}, None)
            try:
                await writer.write([Submission("t1", "d1", token, reading)])
            except DatabaseUnavailable:
                return False
            return True

        stop_at = rng.randrange(200, 300)
        writes = []
        for value in range(WRITES):
            writes.append(asyncio.ensure_future(write(value)))
            await asyncio.sleep(0.0005)
            if value == stop_at:
                writer.stop()
        answers = await asyncio.gather(*writes)
        rows = await pool.fetch("SELECT (metrics->>'v')::float::int AS v FROM telemetry")
        stored = {row["v"] for row in rows}
        refused = [v for v, ok in enumerate(answers) if not ok]
        return (
            sum(v in stored for v in refused),
            sum(ok and v not in stored for v, ok in enumerate(answers)),
            len(refused),
        )
    finally:
        await pool.close()


async def main(runs: int, database_url: str | None, seed: int) -> None:
    rng = random.Random(seed)
    totals = [0, 0, 0]
    async with Postgres(database_url) as pg:
        for n in range(runs):
            counts = await one_run(await pg.fresh_database(), rng)
            totals = [t + c for t, c in zip(totals, counts, strict=True)]
            print(
                f"run {n + 1}: 503 yet stored {counts[0]}, 201 yet missing {counts[1]}, "
                f"503 {counts[2]}",
                flush=True,
            )
    print("| runs | writes | answered 503 | 503 yet stored | 201 yet missing |")
    print("|---|---|---|---|---|")
    print(f"| {runs} | {runs * WRITES} | {totals[2]} | {totals[0]} | {totals[1]} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--database-url", help="another PostgreSQL's admin URL")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.database_url, args.seed))
