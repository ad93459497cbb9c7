"""What each statement of the write path costs PostgreSQL, per row or per device.

    python -m benchmarks.write_costs [--reps 200] [--database-url URL]

One connection to a fresh database (the embedded PostgreSQL unless
``--database-url``), one tenant with 2,000 devices (4 gateways of 500). Each
statement that ingest (``pulse/ingest/queries.sql``) and the rollups
(``pulse/history/queries.sql``) run is sent ``--reps`` times, and timed by its
backend's CPU (``/proc/PID/task/*/schedstat``, exact), the round trip and the
client's work excluded. Variants of one statement run in turns, a rep each, so
that drift falls on all of them. What it answers: where PostgreSQL's time per
reading goes, and what a change to a statement or to the schema would save
(docs/performance.md, "Where PostgreSQL's time goes").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from benchmarks.harness import Postgres, cpu_ns
from pulse.auth.device_tokens import new_device_token
from pulse.db.pool import connect
from pulse.history.rollups import Q as ROLLUP_Q
from pulse.ingest.writer import Q as INGEST_Q

TENANT = "t1"
OTHERS = [f"t{n:02d}" for n in range(2, 11)]  # with TENANT, the ten tenants of a write
DEVICES = [f"gw{g}-dev-{i:04d}" for g in range(4) for i in range(500)]
BATCH = 500
ROLLUP_ROWS = 50_000  # one step of the rollups (pulse.history.rollups.BATCH_IDS)

Statement = Callable[[], Awaitable[object]]


class Bench:
    def __init__(self, conn: asyncpg.Connection, pid: int, reps: int) -> None:
        self.conn = conn
        self.pid = pid
        self.reps = reps
        self.rows: list[tuple[str, float, str]] = []

    async def turns(self, per: int, unit: str, variants: dict[str, Statement]) -> None:
        """Each variant once to warm up, then ``reps`` rounds of one run each, in turns;
        the median CPU per run divided by ``per``, in µs."""
        spent: dict[str, list[float]] = {name: [] for name in variants}
        for run in variants.values():
            await run()
        for _ in range(self.reps):
            for name, run in variants.items():
                before = cpu_ns(self.pid)
                await run()
                spent[name].append((cpu_ns(self.pid) - before) / 1000 / per)
        for name, values in spent.items():
            self.rows.append((name, statistics.median(values), unit))
            print(f"{name:62s} {statistics.median(values):7.2f} µs {unit}", flush=True)


def touch_args(devices: list[str], precision_s: float) -> tuple[object, ...]:
    return [TENANT] * len(devices), devices, precision_s


async def insert(
    conn: asyncpg.Connection,
    devices: list[str],
    when: datetime,
    tenants: tuple[str, ...] = (TENANT,),
) -> None:
    """One write's insert, as the writer makes it: ids reserved (in tenant order), one
    JSON parameter; the rows shared out among ``tenants`` in turn."""
    rows: dict[str, list[list[object]]] = {tenant: [] for tenant in tenants}
    # Values differ from write to write, as a fleet's do: a statement that takes
    # the metrics apart gets no help from PostgreSQL's cache of equal inputs.
    salt = when.timestamp() % 1000
    for i in range(BATCH):
        metrics = {"temp": round(15 + (i + salt) % 15, 3), "hum": round(40 + salt / 100, 3)}
        reading: list[object] = [devices[i % len(devices)], when.isoformat(), metrics, None]
        rows[tenants[i % len(tenants)]].append(reading)
    async with conn.transaction():
        reserved = await conn.fetch(
            INGEST_Q["reserve_event_ids"], list(tenants), [len(rows[tenant]) for tenant in tenants]
        )
        await conn.execute(
            INGEST_Q["insert_telemetry"],
            [
                {"t": r["tenant_id"], "i": r["base"] + 1, "r": rows[r["tenant_id"]]}
                for r in reserved
            ],
        )


async def run(reps: int, database_url: str | None) -> list[tuple[str, float, str]]:
    async with Postgres(database_url) as pg:
        conn = await connect(await pg.fresh_database())
        try:
            await conn.executemany(
                "INSERT INTO tenants (tenant_id) VALUES ($1)", [(t,) for t in [TENANT, *OTHERS]]
            )
            await conn.executemany(
                "INSERT INTO devices (tenant_id, device_id, token_hash) VALUES ($1, $2, $3)",
                [(TENANT, device, new_device_token()[1]) for device in DEVICES],
            )
            bench = Bench(conn, await conn.fetchval("SELECT pg_backend_pid()"), reps)
            gateway = DEVICES[:BATCH]
            now = datetime.now(UTC)

            def insert_of(devices: list[str]) -> Statement:
                return lambda: insert(conn, devices, now)

            await bench.turns(
                BATCH,
                "per device",
                {
                    "token check (device_token_hashes), 500 devices": lambda: conn.fetch(
                        INGEST_Q["device_token_hashes"], [{"t": TENANT, "o": 0, "d": gateway}], 1.0
                    ),
                },
            )

            async def touch(precision_s: float) -> None:
                async with conn.transaction():
                    await conn.fetch(INGEST_Q["touch_devices"], *touch_args(gateway, precision_s))

            await bench.turns(
                BATCH,
                "per device",
                {
                    "touch_devices, 500 devices, every one fresh": lambda: touch(3600.0),
                    "touch_devices, 500 devices, none fresh (each row written)": lambda: touch(0.0),
                },
            )
            await bench.turns(
                BATCH,
                "per row",
                {
                    "insert_telemetry, 500 rows of 20 devices": insert_of(gateway[:20]),
                    "insert_telemetry, 500 rows of 500 devices": insert_of(gateway),
                    "insert_telemetry, 500 rows of 10 tenants (20 devices each)": lambda: insert(
                        conn, gateway[:20], now, tuple(sorted([TENANT, *OTHERS]))
                    ),
                },
            )
            await conn.execute("ALTER TABLE telemetry DISABLE TRIGGER telemetry_notify")
            await bench.turns(
                BATCH,
                "per row",
                {"the same (20 devices), no NOTIFY trigger": insert_of(gateway[:20])},
            )
            await conn.execute("DROP INDEX telemetry_device_latest")
            await bench.turns(
                BATCH,
                "per row",
                {"the same, no trigger and no per-device index": insert_of(gateway[:20])},
            )
            await conn.execute(
                "CREATE INDEX telemetry_device_latest"
                " ON telemetry (tenant_id, device_id, device_time DESC)"
            )
            await conn.execute("ALTER TABLE telemetry ENABLE TRIGGER telemetry_notify")

            async def filled(devices: list[str]) -> tuple[int, int]:
                """2 x ROLLUP_ROWS new rows of ``devices`` within one minute, the first half
                rolled up: the id range of the second, whose buckets then exist (a pass
                under live ingest mostly updates the minutes the pass before wrote)."""
                first = await conn.fetchval(
                    "SELECT last_event_id FROM tenants WHERE tenant_id = $1", TENANT
                )
                start = datetime.now(UTC).replace(second=0, microsecond=0)
                for k in range(2 * ROLLUP_ROWS // BATCH):
                    await insert(conn, devices, start + timedelta(milliseconds=100 * k))
                await conn.execute(ROLLUP_Q["roll_up"], TENANT, first, first + ROLLUP_ROWS)
                return first + ROLLUP_ROWS, first + 2 * ROLLUP_ROWS

            few, many = await filled(DEVICES[:20]), await filled(DEVICES)

            async def roll_up(ids: tuple[int, int]) -> None:
                """One step of the rollups over ``ids``, rolled back: each run counts the
                same rows into the same (empty) rollups."""
                transaction = conn.transaction()
                await transaction.start()
                try:
                    await conn.execute(ROLLUP_Q["roll_up"], TENANT, *ids)
                finally:
                    await transaction.rollback()

            bench.reps = max(3, reps // 10)
            await bench.turns(
                ROLLUP_ROWS,
                "per row",
                {
                    "roll_up, 50,000 rows of 20 devices (2 metrics)": lambda: roll_up(few),
                    "roll_up, 50,000 rows of 2,000 devices (2 metrics)": lambda: roll_up(many),
                },
            )
            return bench.rows
        finally:
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    rows = asyncio.run(run(args.reps, args.database_url))
    print()
    print("| statement | PostgreSQL CPU | |")
    print("|---|---|---|")
    for name, value, unit in rows:
        print(f"| {name} | {value:.2f} µs | {unit} |")


if __name__ == "__main__":
    main()
