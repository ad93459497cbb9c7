"""The telemetry-history scenario (issue #17 item 6).

One device with 7 days of readings at 1 Hz (604,800; 86,400 over 1 day with
--quick) and 99 others with one reading a minute, received over the same days
(so in their daily partitions). Measured, in one run:

- a 7-day chart of the 1 Hz device (bucket=auto: 15-minute buckets, 672 points
  per metric), sequential requests, p50 / p99;
- batch ingest at full speed (4 clients x 500 readings) against the same server,
  against today's code before issue #17 (no partitions, no rollups) on a database
  holding the same rows, and against this code with its rollups paused (a third
  database, its rollups marked as counted, PULSE_ROLLUP_INTERVAL_S an hour): the
  cost of the partitions alone. Round by round, the sides in turn;
- during Pulse's rounds, the rollups' lag behind ingest: how long ago the newest
  counted id was the tenant's newest committed id.

Today's code is the parent of the first commit that added migration 0007, taken
from git into a temporary directory and served from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson

from benchmarks.harness import (
    Figure,
    Postgres,
    PulseServer,
    cpu_meter,
    percentile,
    provision,
    token,
)
from benchmarks.loadgen import post_batches
from pulse.db.migrate import discover, migrate
from pulse.db.pool import connect

TENANT = "tenant-1"
DEVICES = 100
REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def baseline_tree() -> Iterator[Path | None]:
    """Today's code (before issue #17) in a directory of its own, importable as ``pulse``;
    None without the git history that holds it (a shallow clone, an unpacked archive)."""
    try:
        first = subprocess.run(
            ["git", "log", "--format=%H", "--reverse", "--", "migrations/0007_*"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.split()[0]  # fmt: skip
        archive = subprocess.run(
            ["git", "archive", f"{first}^", "pulse", "migrations"],
            cwd=REPO, capture_output=True, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError, IndexError):
        print("   no git history before migration 0007: no 'before' side", flush=True)
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="pulse-baseline-") as tmp:
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        (Path(tmp) / "pulse" / "migrations").symlink_to(Path(tmp) / "migrations")
        yield Path(tmp)


class BaselineServer(PulseServer):
    """Today's code from ``tree``: -P keeps the working directory (this checkout) off
    sys.path, so PYTHONPATH's ``pulse`` is the one imported."""

    def __init__(self, dsn: str, tree: Path) -> None:
        super().__init__(dsn, PYTHONPATH=str(tree))

    def command(self) -> list[str]:
        return [sys.executable, "-P", *super().command()[1:]]


async def database(pg: Postgres, *, partitioned: bool) -> str:
    dsn = await pg.create_database(f"bench_hist_{'new' if partitioned else 'old'}")
    conn = await connect(dsn)
    try:
        await migrate(conn, [m for m in discover() if partitioned or m.version < 7])
    finally:
        await conn.close()
    return dsn


async def fill(dsn: str, days: int, *, partitioned: bool) -> int:
    """The 1 Hz device's readings and the others' (ids reserved as ingest does)."""
    conn = await connect(dsn)
    try:
        now = datetime.now(UTC).replace(microsecond=0)
        start = now - timedelta(days=days)
        if partitioned:
            await conn.execute(
                "SELECT pulse_create_telemetry_partitions($1, $2)", start.date(), now.date()
            )
        fast, slow = days * 86_400, days * 1440
        total = fast + (DEVICES - 1) * slow
        async with conn.transaction():
            base = await conn.fetchval("SELECT pulse_reserve_event_ids($1, $2)", TENANT, total)
            await conn.execute(
                """INSERT INTO telemetry
                          (tenant_id, id, device_id, device_time, received_at, metrics)
                   SELECT $1, $2::bigint + g, 'dev-00000', t, t,
                          jsonb_build_object('temp', round((20 + 5 * sin(g / 3600.0))::numeric, 2),
                                             'hum', round((random() * 80)::numeric, 1))
                     FROM generate_series(1, $4::int) AS g,
                          LATERAL (SELECT $3::timestamptz + make_interval(secs => g)) AS x(t)""",
                TENANT, base, start, fast,
            )  # fmt: skip
            await conn.execute(
                """INSERT INTO telemetry
                          (tenant_id, id, device_id, device_time, received_at, metrics)
                   SELECT $1, $2::bigint + $4::int + (d - 1) * $5::int + g,
                          'dev-' || lpad(d::text, 5, '0'), t, t,
                          jsonb_build_object('temp', round((random() * 30)::numeric, 2),
                                             'hum', round((random() * 80)::numeric, 1))
                     FROM generate_series(1, $6::int) AS d, generate_series(1, $5::int) AS g,
                          LATERAL (SELECT $3::timestamptz + make_interval(mins => g)) AS x(t)""",
                TENANT, base, start, fast, slow, DEVICES - 1,
            )  # fmt: skip
        await conn.execute("VACUUM ANALYZE telemetry")
        return total
    finally:
        await conn.close()


async def caught_up(dsn: str, timeout: float) -> float:
    """Wait until the rollups counted every committed row; return how long it took."""
    conn = await connect(dsn)
    began = time.perf_counter()
    try:
        while time.perf_counter() - began < timeout:
            behind = await conn.fetchval(
                """SELECT t.last_event_id - coalesce(w.last_id, 0) FROM tenants t
                   LEFT JOIN rollup_watermarks w USING (tenant_id) WHERE t.tenant_id = $1""",
                TENANT,
            )
            if behind == 0:
                return time.perf_counter() - began
            await asyncio.sleep(0.2)
        raise RuntimeError(f"the rollups did not catch up in {timeout:.0f} s")
    finally:
        await conn.close()


async def chart_latencies(url: str, requests: int, days: int) -> tuple[list[float], int]:
    end = datetime.now(UTC)
    params = {"from": (end - timedelta(days=days)).isoformat(), "to": end.isoformat()}
    headers = {"Authorization": "Bearer " + token(TENANT, roles=("customer",))}
    latencies = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        path = "/api/v1/customer/devices/dev-00000/telemetry"
        for _ in range(requests):
            sent = time.perf_counter()
            r = await client.get(path, params=params)
            latencies.append(time.perf_counter() - sent)
            r.raise_for_status()
        body = r.json()
    return latencies, len(body["series"]["temp"])


class LagProbe:
    """Samples the tenant's newest committed id and the rollups' watermark."""

    def __init__(self, dsn: str, lags: list[float]) -> None:
        self._dsn = dsn
        self.lags = lags
        self._newest: list[tuple[float, int]] = []  # (when, newest id), increasing

    async def run(self, stop: asyncio.Event) -> None:
        conn = await connect(self._dsn)
        try:
            while not stop.is_set():
                row = await conn.fetchrow(
                    """SELECT t.last_event_id AS newest, coalesce(w.last_id, 0) AS counted
                         FROM tenants t LEFT JOIN rollup_watermarks w USING (tenant_id)
                        WHERE t.tenant_id = $1""",
                    TENANT,
                )
                now = time.perf_counter()
                self._newest.append((now, row["newest"]))
                # The first moment the newest committed id had reached what is counted:
                # the counted rows are that old.
                # (All of them: the lag is 0.)
                since = next((t for t, newest in self._newest if newest >= row["counted"]), now)
                self.lags.append(0.0 if row["counted"] >= row["newest"] else now - since)
                await asyncio.sleep(0.05)
        finally:
            await conn.close()


async def history(pg: Postgres, quick: bool) -> list[Figure]:
    days = 1 if quick else 7
    rounds = 2 if quick else 7
    seconds = 3.0 if quick else 8.0
    requests = 30 if quick else 200
    new_dsn = await database(pg, partitioned=True)
    old_dsn = await database(pg, partitioned=False)
    paused_dsn = await database(pg, partitioned=True)
    rows = 0
    for dsn, partitioned in ((new_dsn, True), (old_dsn, False), (paused_dsn, True)):
        await _tenant(dsn)
        began = time.perf_counter()
        rows = await fill(dsn, days, partitioned=partitioned)
        print(f"   filled {rows:,} rows in {time.perf_counter() - began:.0f} s", flush=True)
    await _counted_already(paused_dsn)
    rng = random.Random(1)
    with baseline_tree() as old_tree:
        async with contextlib.AsyncExitStack() as stack:
            # The rollups count the filled rows from the moment the server runs: the
            # backfill is timed from its start, startup included.
            started = time.perf_counter()
            new = await stack.enter_async_context(PulseServer(new_dsn))
            servers = {"new": new}
            if old_tree is not None:
                servers["old"] = await stack.enter_async_context(BaselineServer(old_dsn, old_tree))
            servers["paused"] = await stack.enter_async_context(
                PulseServer(paused_dsn, PULSE_ROLLUP_INTERVAL_S="3600")
            )
            await caught_up(new_dsn, timeout=1800)
            backfill = time.perf_counter() - started
            devices = {side: await provision(s.url, TENANT, DEVICES) for side, s in servers.items()}
            latencies, points = await chart_latencies(new.url, requests, days)
            rates: dict[str, list[float]] = {side: [] for side in servers}
            cpus: dict[str, list[float]] = {side: [] for side in servers}
            lags: list[float] = []
            sides = list(servers)
            for r in range(rounds):
                for side in sides[r % len(sides) :] + sides[: r % len(sides)]:
                    server = servers[side]
                    load = _bodies(dict(list(devices[side].items())[:20]), rng)
                    stop_probe = asyncio.Event()
                    probe = LagProbe(new_dsn, lags)
                    probing = asyncio.create_task(probe.run(stop_probe)) if side == "new" else None
                    # The CPU of the server and PostgreSQL for the round's rows, the
                    # rollups' pass over them included (until they caught up).
                    with cpu_meter([*pg.pids(), *server.pids()]) as cpu:
                        began = time.perf_counter()
                        stop = began + seconds
                        counts = await asyncio.gather(
                            *(post_batches(server.url, load, stop) for _ in range(4))
                        )
                        rates[side].append(sum(counts) / (time.perf_counter() - began))
                        if probing is not None:
                            await caught_up(new_dsn, timeout=120)
                            stop_probe.set()
                            await probing
                    cpus[side].append(cpu["others_cpu_s"] / sum(counts))
    # Against the code before #17; without it, against this code with rollups paused.
    reference = "old" if "old" in rates else "paused"
    new_rate, old_rate = statistics.median(rates["new"]), statistics.median(rates[reference])
    ratios = [n / o for n, o in zip(rates["new"], rates[reference], strict=True)]
    paused_rate = statistics.median(rates["paused"])
    paused_ratios = [p / o for p, o in zip(rates["paused"], rates[reference], strict=True)]
    label = f"history: 1 device at 1 Hz for {days} d + {DEVICES - 1} at 1/min ({rows:,} rows)"
    return [
        Figure(
            label, f"{days}-day chart (bucket=auto), p50", percentile(latencies, 50) * 1e3, "ms",
            note=f"{points} points per metric, 2 metrics; {requests} sequential requests",
        ),
        Figure(
            label, f"{days}-day chart (bucket=auto), p99", percentile(latencies, 99) * 1e3, "ms",
            target="<= 100 ms",
        ),
        Figure(
            label, "rollup lag behind batch ingest, p50", percentile(lags, 50), "s",
            note=f"{len(lags)} samples every 50 ms during Pulse's ingest rounds",
        ),
        Figure(
            label, "rollup lag behind batch ingest, max", max(lags), "s",
            target="<= 2 s",
        ),
        Figure(label, "batch ingest before issue #17" if reference == "old"
               else "batch ingest, rollups paused (no git history: no 'before' side)",
               old_rate, "rows/s",
               note=f"median of {rounds} rounds of {seconds:g} s, 4 clients x 500 readings"),
        Figure(
            label, "batch ingest with partitions and rollups", new_rate, "rows/s",
            target=">= 0.9x before", baseline=old_rate,
            note=f"in turn with the above; round ratios {', '.join(f'{x:.2f}' for x in ratios)}",
        ),
        Figure(
            label, "batch ingest with partitions, rollups paused", paused_rate, "rows/s",
            baseline=old_rate,
            note="in turn with the above; round ratios "
            + ", ".join(f"{x:.2f}" for x in paused_ratios),
        ),
        *(
            Figure(
                label, f"server + PostgreSQL CPU per reading, {name}",
                statistics.median(cpus[side]) * 1e6, "µs",
                baseline=None if side == reference else statistics.median(cpus[reference]) * 1e6,
                note="median of the rounds; the rollups' pass over a round's rows included",
            )
            for side, name in (
                (reference, "before issue #17" if reference == "old" else "rollups paused"),
                ("new", "with partitions and rollups"),
                *((("paused", "rollups paused"),) if reference == "old" else ()),
            )
        ),
        Figure(label, "rollup backfill of the filled rows", rows / backfill, "rows/s",
               note=f"{backfill:.1f} s from the server's start, its startup included"),
    ]  # fmt: skip


async def _counted_already(dsn: str) -> None:
    """The rollups start at the newest row: the paused side never counts the fill."""
    conn = await connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO rollup_watermarks (tenant_id, last_id)
               SELECT tenant_id, last_event_id FROM tenants"""
        )
    finally:
        await conn.close()


async def _tenant(dsn: str) -> None:
    conn = await connect(dsn)
    try:
        await conn.execute("INSERT INTO tenants (tenant_id) VALUES ($1)", TENANT)
    finally:
        await conn.close()


def _bodies(devices: dict[str, str], rng: random.Random) -> list[bytes]:
    out = []
    for _ in range(8):
        messages = []
        for _ in range(500):
            device_id, device_token = rng.choice(list(devices.items()))
            messages.append(
                {
                    "tenant_id": TENANT,
                    "device_id": device_id,
                    "provision_token": device_token,
                    "metrics": {
                        "temp": round(rng.uniform(15, 30), 2),
                        "hum": round(rng.uniform(20, 80), 1),
                    },
                }
            )
        out.append(orjson.dumps({"messages": messages}))
    return out
