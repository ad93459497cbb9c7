"""Ingest throughput with ten alert rules per tenant against none, in one run.

    python -m benchmarks.rules_overhead [--seconds 4] [--rounds 7] [--outliers 0.01]
                                        [--database-url URL]

One server and one database serve both sides: tenants without rules and
tenants with ten rules each (which about one reading in a hundred breaks, so
alerts are raised, counted and closed all along). Both sides run the same
server code, rules hook included: the difference is what ten rules cost.
Each round runs both sides back to back, in alternating order, so that drift
(a growing table, a warming cache, the load of other programs on the machine)
falls on both; the throughputs are the medians of the rounds, the ratio the
median of the rounds' own ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Sequence

import asyncpg
import httpx
import orjson

from benchmarks.harness import Postgres, PulseServer, provision, token
from benchmarks.loadgen import HttpConnection, post_batches

TENANTS_PER_SIDE = 4
DEVICES_PER_TENANT = 20
BATCH_CLIENTS, BATCH_SIZE = 4, 500
SINGLE_CLIENTS = 32
TARGET = 0.8

# Ten rules, nine of them for every device.
RULES = [
    {"metric": "temp", "operator": ">", "threshold": 40, "severity": 4},
    {"metric": "temp", "operator": "<", "threshold": 10, "severity": 3},
    {"metric": "hum", "operator": ">=", "threshold": 90, "severity": 2},
    {"metric": "hum", "operator": "<=", "threshold": 10, "severity": 2},
    {"metric": "pressure", "operator": ">", "threshold": 1050, "severity": 3},
    {"metric": "battery", "operator": "<", "threshold": 5, "severity": 5},
    {"metric": "door_open", "operator": "==", "threshold": 1, "severity": 1},
    {"metric": "rssi", "operator": "<=", "threshold": -100, "severity": 1},
    {"metric": "vibration", "operator": "!=", "threshold": 0, "severity": 2},
    {"metric": "temp", "operator": ">", "threshold": 35, "severity": 3, "device_id": "dev-00000"},
]
# About one reading in a hundred breaks a rule (the next one is back within
# bounds): alerts are raised and closed all along, as in a fleet with trouble.
OUTLIERS = [
    ("temp", 45.0),
    ("temp", 5.0),
    ("hum", 95.0),
    ("hum", 5.0),
    ("pressure", 1060.0),
    ("battery", 2),
    ("door_open", True),
    ("rssi", -110),
    ("vibration", 3),
]
OUTLIER_RATE = 0.01


def reading(rng: random.Random, outlier_rate: float) -> dict[str, float | bool]:
    metrics: dict[str, float | bool] = {
        "temp": round(rng.uniform(15, 30), 2),
        "hum": round(rng.uniform(20, 80), 1),
        "pressure": round(rng.uniform(980, 1040), 1),
        "battery": rng.randint(10, 100),
        "door_open": False,
        "rssi": rng.randint(-95, -40),
        "vibration": 0,
    }
    if rng.random() < outlier_rate:
        name, value = rng.choice(OUTLIERS)
        metrics[name] = value
    return metrics


async def add_rules(url: str, tenant_id: str) -> None:
    headers = {"Authorization": "Bearer " + token(tenant_id)}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        for i, rule in enumerate(RULES):
            response = await client.post(
                "/api/v1/customer/alert-rules", json={"name": f"rule-{i}", **rule}
            )
            response.raise_for_status()


Devices = list[tuple[str, str, str]]  # (tenant, device, provision token)


async def batch_round(
    url: str, devices: Devices, seconds: float, seed: int, outlier_rate: float
) -> float:
    rng = random.Random(seed)

    def body() -> bytes:
        messages = []
        for _ in range(BATCH_SIZE):
            tenant, device, device_token = rng.choice(devices)
            messages.append(
                {
                    "tenant_id": tenant,
                    "device_id": device,
                    "provision_token": device_token,
                    "metrics": reading(rng, outlier_rate),
                }
            )
        return orjson.dumps({"messages": messages})

    bodies = [body() for _ in range(8)]

    started = time.perf_counter()
    counts = await asyncio.gather(
        *(post_batches(url, bodies, started + seconds) for _ in range(BATCH_CLIENTS))
    )
    return sum(counts) / (time.perf_counter() - started)


async def single_round(
    url: str, devices: Devices, seconds: float, seed: int, outlier_rate: float
) -> float:
    accepted = 0

    async def client(tenant: str, device: str, device_token: str, stop: float) -> None:
        nonlocal accepted
        rng = random.Random(f"{seed}:{tenant}:{device}")
        conn = await HttpConnection(url).open()
        path = f"/ingest/v1/tenant/{tenant}/device/{device}/telemetry"
        headers = {"X-Provision-Token": device_token}
        while time.perf_counter() < stop:
            request = conn.build(
                "POST", path, orjson.dumps({"metrics": reading(rng, outlier_rate)}), headers
            )
            status, payload = await conn.exchange(request)
            assert status == 201, (status, payload[:200])
            accepted += 1
        await conn.close()

    # Spread the clients over the side's tenants, one device each.
    by_tenant: dict[str, Devices] = {}
    for device in devices:
        by_tenant.setdefault(device[0], []).append(device)
    tenants = list(by_tenant)
    chosen = [
        by_tenant[tenants[i % len(tenants)]][i // len(tenants)] for i in range(SINGLE_CLIENTS)
    ]
    started = time.perf_counter()
    await asyncio.gather(*(client(*device, started + seconds) for device in chosen))
    return accepted / (time.perf_counter() - started)


async def run(seconds: float, rounds: int, outlier_rate: float, database_url: str | None) -> None:
    async with Postgres(database_url) as pg:
        dsn = await pg.fresh_database()
        async with PulseServer(dsn) as server:
            sides: dict[str, Devices] = {}
            for side in ("no rules", "10 rules"):
                sides[side] = []
                for t in range(TENANTS_PER_SIDE):
                    tenant = f"{'plain' if side == 'no rules' else 'ruled'}-{t:02d}"
                    tokens = await provision(server.url, tenant, DEVICES_PER_TENANT)
                    sides[side] += [(tenant, d, tok) for d, tok in tokens.items()]
                    if side == "10 rules":
                        await add_rules(server.url, tenant)
            workloads = {
                f"batch, {BATCH_CLIENTS} clients x {BATCH_SIZE} readings": batch_round,
                f"single reading, {SINGLE_CLIENTS} clients": single_round,
            }
            rates: dict[tuple[str, str], list[float]] = {}
            # Warm-up: connections, prepared statements, caches.
            for workload in workloads.values():
                for devices in sides.values():
                    await workload(server.url, devices, min(2.0, seconds), 0, outlier_rate)
            for r in range(rounds):
                for name, workload in workloads.items():
                    order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                    for side in order:
                        rate = await workload(server.url, sides[side], seconds, r + 1, outlier_rate)
                        rates.setdefault((name, side), []).append(rate)
            alerts = await alert_counts(dsn)
    print_table(workloads, rates, seconds, rounds, outlier_rate, alerts)


async def alert_counts(dsn: str) -> tuple[int, int, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT count(*) AS alerts,
                      count(*) FILTER (WHERE status <> 'CLOSED') AS active,
                      coalesce(sum(trigger_count), 0) AS triggers
                 FROM alerts WHERE alert_type = 'THRESHOLD'"""
        )
    finally:
        await conn.close()
    return int(row["alerts"]), int(row["active"]), int(row["triggers"])


def print_table(
    workloads: dict[str, object],
    rates: dict[tuple[str, str], list[float]],
    seconds: float,
    rounds: int,
    outlier_rate: float,
    alerts: tuple[int, int, int],
) -> None:
    print(
        f"\nIngest throughput, readings/s: median of {rounds} rounds of {seconds:g} s, "
        f"one server and one run; {outlier_rate:.1%} of readings break a rule"
    )
    header = f"{'workload':<36} {'no rules':>10} {'10 rules':>10} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    for name in workloads:
        plain, ruled = rates[(name, "no rules")], rates[(name, "10 rules")]
        # Each round's two sides ran back to back: their ratio is the figure least
        # disturbed by whatever else the machine was doing at the time.
        ratio = statistics.median(r / p for p, r in zip(plain, ruled, strict=True))
        verdict = "ok" if ratio >= TARGET else "BELOW"
        print(
            f"{name:<36} {statistics.median(plain):>10,.0f} {statistics.median(ruled):>10,.0f} "
            f"{ratio:>7.2f}  >= {TARGET} {verdict}"
        )
    print(
        "\nratio: the median of the rounds' own ratios (each round runs both sides back to "
        "back).\n"
        f"The ruled tenants raised {alerts[0]:,} threshold alerts ({alerts[1]:,} still active) "
        f"from {alerts[2]:,} violating readings.\nEach round, readings/s:"
    )
    for name in workloads:
        for side in ("no rules", "10 rules"):
            values = rates[(name, side)]
            print(f"  {name} / {side}: " + ", ".join(f"{v:,.0f}" for v in values))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rules_overhead")
    parser.add_argument("--seconds", type=float, default=4.0, help="per round and side")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--outliers", type=float, default=OUTLIER_RATE, help="share of readings that break a rule"
    )
    parser.add_argument("--database-url", default=None, help="admin URL of a server to use")
    args = parser.parse_args(argv)
    asyncio.run(run(args.seconds, args.rounds, args.outliers, args.database_url))


if __name__ == "__main__":
    main()
