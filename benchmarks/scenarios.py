"""The benchmark scenarios. Each measures its own baseline in the same run."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import httpx
import orjson

from benchmarks.harness import (
    BackendCpu,
    Figure,
    NatsProcess,
    Postgres,
    PulseServer,
    TypicalServer,
    cpu_meter,
    free_port,
    listening_backends,
    nats_server_binary,
    percentile,
    processes_cpu_s,
    provision,
    token,
)
from benchmarks.history import history
from benchmarks.loadgen import HttpConnection, StreamCounter, post_batches
from benchmarks.mqtt import mqtt_ingest
from benchmarks.stuck_readers import stuck_readers
from pulse.history.rollups import LEADER_NAME as ROLLUPS_NAME

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"
WS_PATH = "/api/v1/customer/telemetry/stream"
Scenario = Callable[[Postgres, bool], Awaitable[list[Figure]]]


def _reading(rng: random.Random) -> dict[str, float]:
    return {"temp": round(rng.uniform(15, 30), 2), "hum": round(rng.uniform(20, 80), 1)}


# -- ingest: batches ------------------------------------------------------------


def _batch_bodies(
    rng: random.Random, devices: dict[str, dict[str, str]], batch: int, count: int = 8
) -> list[bytes]:
    """``count`` batch bodies of ``batch`` readings, the tenants of ``devices`` in turn
    (tenant -> device id -> provision token), each from one of its devices at random."""
    tenants = list(devices)
    out = []
    for _ in range(count):
        messages = []
        for i in range(batch):
            tenant = tenants[i % len(tenants)]
            device_id, device_token = rng.choice(list(devices[tenant].items()))
            messages.append(
                {
                    "tenant_id": tenant,
                    "device_id": device_id,
                    "provision_token": device_token,
                    "metrics": _reading(rng),
                }
            )
        out.append(orjson.dumps({"messages": messages}))
    return out


async def ingest_batch(pg: Postgres, quick: bool) -> list[Figure]:
    figures = []
    for tenants in (1, 10):
        figures += await _ingest_batch(pg, quick, tenants)
    return figures


async def _ingest_batch(pg: Postgres, quick: bool, tenant_count: int) -> list[Figure]:
    seconds = 4.0 if quick else 15.0
    clients, batch = 4, 500
    tenants = [f"tenant-{t:02d}" for t in range(tenant_count)]
    rng = random.Random(1)

    dsn = await pg.fresh_database()
    async with PulseServer(dsn) as server:
        devices = {t: await provision(server.url, t, 20) for t in tenants}
        # The same readings for both servers (the typical stack ignores the tokens).
        load = _batch_bodies(rng, devices, batch)
        (
            pulse_rate,
            pulse_lat,
            pulse_cpu,
            pulse_db,
            pulse_rollups,
            pulse_all,
        ) = await _measure_batches(server, dsn, [load] * clients, seconds)
    dsn = await pg.fresh_database()
    async with TypicalServer(dsn) as typical:
        typical_rate, typical_lat, typical_cpu, typical_db, _, typical_all = await _measure_batches(
            typical, dsn, [load] * clients, seconds
        )
    ceiling = await _direct_sql_ceiling(pg, tenants, seconds, clients, batch)

    label = f"batch ingest, {tenant_count} tenant{'s' if tenant_count > 1 else ''}"
    return [
        Figure(
            label,
            "typical stack",
            typical_rate,
            "rows/s",
            note=f"p99 {percentile(typical_lat, 99) * 1e3:.0f} ms, "
            f"server {typical_cpu * 1e6:.1f} us CPU/row, "
            f"PostgreSQL {typical_db * 1e6:.1f} us CPU/row "
            f"(the whole server {typical_all * 1e6:.1f})",
        ),
        Figure(label, "direct-SQL ceiling", ceiling, "rows/s"),
        Figure(
            label,
            "Pulse HTTP batch ingest",
            pulse_rate,
            "rows/s",
            target=">= 1.5x typical, >= 0.7x ceiling, p99 <= 100 ms, <= 8 us/row",
            baseline=typical_rate,
            note=f"{pulse_rate / ceiling:.2f}x ceiling; {clients} clients x {batch} readings; "
            f"p99 {percentile(pulse_lat, 99) * 1e3:.0f} ms; "
            f"server {pulse_cpu * 1e6:.1f} us CPU/row, "
            f"PostgreSQL {pulse_db * 1e6:.1f} us CPU/row (rollups {pulse_rollups * 1e6:.1f}; "
            f"the whole server {pulse_all * 1e6:.1f})",
        ),
    ]


async def _measure_batches(
    server: PulseServer | TypicalServer, dsn: str, loads: list[list[bytes]], seconds: float
) -> tuple[float, list[float], float, float, float, float]:
    """One client per load, each posting its bodies in turn for ``seconds``: rows/s,
    per-request latencies, server and PostgreSQL CPU seconds per row, the share of
    the latter spent by Pulse's rollups (pulse.history.rollups), and the whole
    PostgreSQL server's per row (its background processes too: BackendCpu)."""
    latencies: list[float] = []
    async with BackendCpu(dsn) as database:
        with cpu_meter(server.pids()) as cpu:
            stop = time.perf_counter() + seconds
            counts = await asyncio.gather(
                *(post_batches(server.url, load, stop, latencies) for load in loads)
            )
    rows = max(1, sum(counts))
    rollups = database.by_name.get(ROLLUPS_NAME, 0.0)
    return (
        rows / cpu["wall_s"],
        latencies,
        cpu["others_cpu_s"] / rows,
        database.seconds / rows,
        rollups / rows,
        database.server_seconds / rows,
    )


async def ingest_gateways(pg: Postgres, quick: bool) -> list[Figure]:
    """Batch ingest of one tenant as a fleet sends it: 4 gateways of 500 devices each,
    every batch a reading of each of its gateway's devices (no device in two gateways),
    against the typical stack in the same run."""
    seconds = 4.0 if quick else 15.0
    gateways, per_gateway = 4, 100 if quick else 500
    tenant = "tenant-00"
    rng = random.Random(5)

    def bodies(devices: list[tuple[str, str]]) -> list[bytes]:
        return [
            orjson.dumps(
                {
                    "messages": [
                        {
                            "tenant_id": tenant,
                            "device_id": device_id,
                            "provision_token": device_token,
                            "metrics": _reading(rng),
                        }
                        for device_id, device_token in devices
                    ]
                }
            )
            for _ in range(4)
        ]

    dsn = await pg.fresh_database()
    async with PulseServer(dsn) as server:
        devices = list((await provision(server.url, tenant, gateways * per_gateway)).items())
        loads = [bodies(devices[g * per_gateway : (g + 1) * per_gateway]) for g in range(gateways)]
        pulse = await _measure_batches(server, dsn, loads, seconds)
    dsn = await pg.fresh_database()
    async with TypicalServer(dsn) as typical_server:
        typical = await _measure_batches(typical_server, dsn, loads, seconds)
    label = f"batch ingest, 1 tenant, {gateways} gateways x {per_gateway} devices"

    def note(
        rate: float,
        latencies: list[float],
        cpu: float,
        database: float,
        rollups: float,
        whole: float,
    ) -> str:
        return (
            f"p99 {percentile(latencies, 99) * 1e3:.0f} ms, server {cpu * 1e6:.1f} us CPU/row, "
            f"PostgreSQL {database * 1e6:.1f} us CPU/row ("
            + (f"rollups {rollups * 1e6:.1f}; " if rollups else "")
            + f"the whole server {whole * 1e6:.1f})"
        )

    return [
        Figure(label, "typical stack", typical[0], "rows/s", note=note(*typical)),
        Figure(
            label,
            "Pulse HTTP batch ingest",
            pulse[0],
            "rows/s",
            target=">= 1.5x typical",
            baseline=typical[0],
            note=note(*pulse),
        ),
    ]


async def ingest_batch_workers(pg: Postgres, quick: bool) -> list[Figure]:
    """Batch ingest of one tenant and of ten, by one server process and by two (one per
    core), in turns in the same run: the factor two processes give."""
    seconds = 4.0 if quick else 15.0
    clients, batch = 8, 500
    figures = []
    for tenant_count in (1, 10):
        tenants = [f"tenant-{t:02d}" for t in range(tenant_count)]
        rng = random.Random(3)
        rates: dict[int, list[float]] = {1: [], 2: []}
        cpu: dict[int, list[float]] = {1: [], 2: []}
        splits: list[list[int]] = []  # each two-process run's clients per process
        for _ in range(1 if quick else 2):
            for workers in (1, 2):
                dsn = await pg.fresh_database()
                async with PulseServer(dsn, PULSE_WORKERS=str(workers)) as server:
                    devices = {t: await provision(server.url, t, 20) for t in tenants}
                    load = _batch_bodies(rng, devices, batch)
                    with cpu_meter(server.pids()) as used:
                        stop = time.perf_counter() + seconds
                        counts, split = await asyncio.gather(
                            asyncio.gather(
                                *(post_batches(server.url, load, stop) for _ in range(clients))
                            ),
                            _split_of(server),
                        )
                    if workers == 2:
                        splits.append(split)
                    rows = sum(counts)
                    rates[workers].append(rows / used["wall_s"])
                    cpu[workers].append(used["others_cpu_s"] / max(1, rows))
        label = f"batch ingest, {tenant_count} tenant{'s' if tenant_count > 1 else ''}, "
        label += f"{clients} clients"
        one, two = statistics.median(rates[1]), statistics.median(rates[2])
        figures += [
            Figure(
                label,
                "1 process",
                one,
                "rows/s",
                note=f"server {statistics.median(cpu[1]) * 1e6:.1f} us CPU/row",
            ),
            Figure(
                label,
                "2 processes (PULSE_WORKERS=2)",
                two,
                "rows/s",
                target="scales",
                baseline=one,
                note=f"server {statistics.median(cpu[2]) * 1e6:.1f} us CPU/row; clients per "
                f"process {' and '.join('/'.join(map(str, split)) for split in splits)}",
            ),
        ]
    return figures


async def _split_of(server: PulseServer) -> list[int]:
    """The clients each server process holds, a second into a run (all connected)."""
    await asyncio.sleep(1.0)
    return server.connections_per_process()


async def _direct_sql_ceiling(
    pg: Postgres, tenants: list[str], seconds: float, clients: int, batch: int
) -> float:
    """The same rows straight into the same schema: same id reservation, same trigger."""
    dsn = await pg.fresh_database()
    pool = await asyncpg.create_pool(dsn, min_size=clients, max_size=clients)
    assert pool is not None
    await pool.executemany("INSERT INTO tenants (tenant_id) VALUES ($1)", [(t,) for t in tenants])
    rng = random.Random(2)
    written = 0

    async def client(stop: float) -> None:
        nonlocal written
        while time.perf_counter() < stop:
            rows = [
                (tenants[i % len(tenants)], f"dev-{rng.randrange(20):05d}") for i in range(batch)
            ]
            by_tenant = sorted({t for t, _ in rows})
            async with pool.acquire() as conn, conn.transaction():
                bases = dict(
                    await conn.fetch(
                        "SELECT r.t, pulse_reserve_event_ids(r.t, r.n) FROM unnest($1::text[], "
                        "$2::int[]) WITH ORDINALITY AS r(t, n, o) ORDER BY r.o",
                        by_tenant,
                        [sum(1 for t, _ in rows if t == tenant) for tenant in by_tenant],
                    )
                )
                next_id = {t: bases[t] for t in by_tenant}
                ids = []
                for t, _ in rows:
                    next_id[t] += 1
                    ids.append(next_id[t])
                await conn.execute(
                    "INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics, seq) "
                    "SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], "
                    "$4::timestamptz[], $5::jsonb[], $6::bigint[])",
                    [t for t, _ in rows],
                    ids,
                    [d for _, d in rows],
                    [time.time_ns() // 1000 and _now()] * batch,
                    [orjson.dumps(_reading(rng)).decode() for _ in rows],
                    [None] * batch,
                )
            written += batch

    start = time.perf_counter()
    await asyncio.gather(*(client(start + seconds) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    await pool.close()
    return written / elapsed


def _now():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC)


# -- ingest: single readings ----------------------------------------------------


async def ingest_single(pg: Postgres, quick: bool) -> list[Figure]:
    return await _ingest_single(pg, quick, workers=1)


async def ingest_single_workers(pg: Postgres, quick: bool) -> list[Figure]:
    """The same with one server process per core."""
    return await _ingest_single(pg, quick, workers=2)


async def _ingest_single(pg: Postgres, quick: bool, *, workers: int) -> list[Figure]:
    seconds = 4.0 if quick else 15.0
    # Requests sent in the first second (connections opening, first queries
    # planned) are left out of the figures.
    warmup = 1.0
    clients = 64

    async def measure(
        server: PulseServer, devices: dict[str, str]
    ) -> tuple[float, list[float], float]:
        """req/s, latencies, server CPU seconds per request."""
        latencies: list[float] = []
        start = time.perf_counter()
        measured_from, stop = start + warmup, start + warmup + seconds

        async def client(device_id: str, device_token: str) -> None:
            conn = await HttpConnection(server.url).open()
            rng = random.Random(device_id)
            path = f"/ingest/v1/tenant/tenant-1/device/{device_id}/telemetry"
            while time.perf_counter() < stop:
                request = conn.build(
                    "POST",
                    path,
                    orjson.dumps({"metrics": _reading(rng)}),
                    {"X-Provision-Token": device_token},
                )
                sent = time.perf_counter()
                status, payload = await conn.exchange(request)
                assert status == 201, (status, payload[:200])
                if sent >= measured_from:
                    latencies.append(time.perf_counter() - sent)
            await conn.close()

        tasks = [asyncio.ensure_future(client(d, t)) for d, t in devices.items()]
        await asyncio.sleep(max(0.0, measured_from - time.perf_counter()))
        with cpu_meter(server.pids()) as cpu:
            await asyncio.gather(*tasks)
        return len(latencies) / cpu["wall_s"], latencies, cpu["others_cpu_s"] / len(latencies)

    results = {}
    for group_commit in ("0", "1"):
        env = {"PULSE_GROUP_COMMIT": group_commit, "PULSE_WORKERS": str(workers)}
        async with PulseServer(await pg.fresh_database(), **env) as server:
            devices = await provision(server.url, "tenant-1", clients)
            results[group_commit] = await measure(server, devices)
    async with TypicalServer(await pg.fresh_database()) as typical:
        typical_rate, typical_lat, typical_cpu = await measure(typical, devices)
    serial_rate, serial_lat, _ = results["0"]
    rate, lat, cpu_per_request = results["1"]
    processes = f", {workers} processes" if workers > 1 else ""
    scenario = f"single-reading ingest, 64 clients{processes}"

    def latency(values: list[float]) -> str:
        return (
            f"p50 {percentile(values, 50) * 1e3:.1f} ms, p99 {percentile(values, 99) * 1e3:.1f} ms"
        )

    return [
        Figure(
            scenario,
            "typical stack",
            typical_rate,
            "req/s",
            note=f"{latency(typical_lat)}; server {typical_cpu * 1e6:.0f} us CPU/request",
        ),
        Figure(
            scenario,
            "Pulse, one transaction per request",
            serial_rate,
            "req/s",
            note=latency(serial_lat),
        ),
        Figure(
            scenario,
            "Pulse, group commit",
            rate,
            "req/s",
            target=">= 1x typical, p99 <= 50 ms",
            baseline=typical_rate,
            note=f"{rate / serial_rate:.2f}x one transaction per request; {latency(lat)}; "
            f"server {cpu_per_request * 1e6:.0f} us CPU per request",
        ),
    ]


# -- fan-out --------------------------------------------------------------------


async def fanout_sse(pg: Postgres, quick: bool) -> list[Figure]:
    return await _fanout(pg, quick, "sse")


async def fanout_ws(pg: Postgres, quick: bool) -> list[Figure]:
    return await _fanout(pg, quick, "websocket")


async def fanout_workers(pg: Postgres, quick: bool) -> list[Figure]:
    """The latency target's rate with one server process per core."""
    figures = await _fanout(pg, quick, "sse", workers=2, rates=(20,))
    return figures + await _fanout(pg, quick, "websocket", workers=2, rates=(20,))


async def _fanout(
    pg: Postgres,
    quick: bool,
    kind: str,
    *,
    workers: int = 1,
    rates: tuple[int, ...] | None = None,
) -> list[Figure]:
    subscribers = 200 if quick else 1000
    if rates is None:
        rates = (20, 100) if quick else (20, 100, 200)  # events/s ingested
    seconds = 3.0 if quick else 8.0
    dsn = await pg.fresh_database()
    figures = []
    async with PulseServer(dsn, PULSE_WORKERS=str(workers)) as server:
        devices = sorted(await provision(server.url, "tenant-1", 25))
        tok = token("tenant-1", roles=("customer",))
        path = SSE_PATH if kind == "sse" else f"{WS_PATH}?token={tok}"
        async with _subscribers(server.url, kind, path, tok, subscribers) as counters:
            processes = f", {workers} processes" if workers > 1 else ""
            for rate in rates:
                figures += await _deliveries(
                    f"fan-out {kind}, {subscribers} subscribers, {rate} events/s{processes}",
                    dsn, counters, devices, rate, seconds, server.pids(),
                )  # fmt: skip
    if kind == "sse" and workers == 1:
        figures += await _bare_fanout(dsn, devices, subscribers, seconds)
    return figures


async def _bare_fanout(
    dsn: str, devices: list[str], subscribers: int, seconds: float
) -> list[Figure]:
    """The same clients and commits against benchmarks/bare_fanout.py: the floor."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.bare_fanout", dsn, "tenant-1", str(port),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), 30)
        url = f"http://127.0.0.1:{port}"
        async with _subscribers(url, "sse", SSE_PATH, "", subscribers) as counters:
            return await _deliveries(
                f"bare fan-out floor, {subscribers} subscribers, 20 events/s",
                dsn, counters, devices, 20, seconds, [proc.pid],
            )  # fmt: skip
    finally:
        proc.terminate()
        await proc.wait()


@contextlib.asynccontextmanager
async def _subscribers(
    url: str, kind: str, path: str, tok: str, count: int
) -> AsyncIterator[list[StreamCounter]]:
    counters = [StreamCounter() for _ in range(count)]
    tasks = []
    for counter in counters:
        if kind == "sse":
            tasks.append(asyncio.create_task(counter.sse(url, path, tok)))
        else:
            tasks.append(asyncio.create_task(counter.websocket(url, path)))
        if len(tasks) % 100 == 0:
            await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in counters)), 60)
        failures = [c.failed for c in counters if c.failed]
        if failures:
            raise RuntimeError(f"{len(failures)} subscribers failed: {failures[0]}")
        await asyncio.sleep(0.5)  # let every subscription reach the hub
        yield counters
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclasses.dataclass
class Deliveries:
    events: int  # committed
    delivered: int
    expected: int
    latencies: list[float]  # commit-to-client, seconds
    bare_latencies: list[float]  # commit-to-notification of a bare LISTEN (when asked for)
    committed_at: dict[int, float]  # event id -> when its COMMIT was sent
    cpu: dict[str, float]  # cpu_meter's: wall_s, client_cpu_s, others_cpu_s
    bus: dict[str, float] = dataclasses.field(default_factory=dict)  # NATS mode's counters


async def _deliveries(
    scenario: str,
    dsn: str,
    counters: list[StreamCounter],
    devices: list[str],
    rate: int,
    seconds: float,
    pids: list[int],
) -> list[Figure]:
    """Commit ``rate`` events/s for ``seconds``; deliveries/s and commit-to-client latency.

    Commits come straight from here, so that the moment of each commit is known:
    the latency is commit-to-client, as in the target, and the server spends its
    time on fan-out only (ingest has its own scenarios). The clock starts as
    COMMIT is sent, so the commit itself is counted. A bare LISTEN on the same
    channel gives the database's own notification latency.
    """
    d = await _measure_deliveries(dsn, counters, devices, rate, seconds, pids, bare=True)
    return [
        Figure(
            scenario,
            "deliveries",
            d.delivered / seconds,
            "events/s",
            target=">= 100,000" if rate * len(counters) >= 100_000 else "",
            note=f"{d.delivered}/{d.expected} delivered; server CPU "
            f"{d.cpu['others_cpu_s'] / d.cpu['wall_s']:.0%}, client CPU "
            f"{d.cpu['client_cpu_s'] / d.cpu['wall_s']:.0%}",
        ),
        Figure(
            scenario,
            "commit-to-client latency p50 / p99",
            percentile(d.latencies, 50) * 1e3,
            "ms",
            target="p50 <= 5, p99 <= 50, p99 within 10 of bare"
            if rate == 20 and scenario.startswith("fan-out")
            else "",
            note=f"p99 {percentile(d.latencies, 99) * 1e3:.1f} ms; bare LISTEN p50 "
            f"{percentile(d.bare_latencies, 50) * 1e3:.1f} ms, p99 "
            f"{percentile(d.bare_latencies, 99) * 1e3:.1f} ms",
        ),
    ]


async def _measure_deliveries(
    dsn: str,
    counters: list[StreamCounter],
    devices: list[str],
    rate: int,
    seconds: float,
    pids: list[int],
    *,
    bare: bool,
) -> Deliveries:
    listen = await asyncpg.connect(dsn) if bare else None
    writer = await asyncpg.connect(dsn)
    bare_at: list[tuple[int, float]] = []

    def on_notify(*args: object) -> None:
        message = orjson.loads(str(args[3]))
        if message.get("kind") == "telemetry":
            bare_at.append((message["last"], time.perf_counter()))

    if listen is not None:
        channel = await listen.fetchval("SELECT pulse_channel('tenant-1')")
        await listen.add_listener(channel, on_notify)
    rng = random.Random(3)
    for c in counters:
        c.events, c.samples = 0, []
    committed_at: dict[int, float] = {}
    per_batch = max(1, rate // 20)  # a batch every 50 ms
    with cpu_meter(pids) as cpu:
        start = time.perf_counter()
        n = 0
        while time.perf_counter() < start + seconds:
            rows = [(rng.choice(devices), _reading(rng)) for _ in range(per_batch)]
            ids, t_commit = await _commit_readings(writer, "tenant-1", rows)
            for event_id in ids:
                committed_at[event_id] = t_commit
            n += 1
            await asyncio.sleep(max(0.0, start + n * 0.05 - time.perf_counter()))
        await asyncio.sleep(1.0)  # let deliveries finish
    await writer.close()
    if listen is not None:
        await listen.close()
    return Deliveries(
        events=len(committed_at),
        delivered=sum(c.events for c in counters),
        expected=len(committed_at) * len(counters),
        latencies=[
            t - committed_at[i] for c in counters for i, t in c.samples if i in committed_at
        ],
        bare_latencies=[t - committed_at[i] for i, t in bare_at if i in committed_at],
        committed_at=committed_at,
        cpu=cpu,
    )


async def _commit_readings(
    conn: asyncpg.Connection, tenant_id: str, rows: list[tuple[str, dict[str, float]]]
) -> tuple[list[int], float]:
    """Commit readings the way ingest does (ids reserved, one insert, the NOTIFY trigger);
    return their ids and the moment COMMIT was sent."""
    async with conn.transaction():
        base = await conn.fetchval("SELECT pulse_reserve_event_ids($1, $2)", tenant_id, len(rows))
        await conn.execute(
            "INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics) "
            "SELECT $1, $2 + r.n, r.device_id, now(), r.metrics "
            "FROM unnest($3::text[], $4::jsonb[]) WITH ORDINALITY AS r(device_id, metrics, n)",
            tenant_id,
            base,
            [device for device, _ in rows],
            [orjson.dumps(metrics).decode() for _, metrics in rows],
        )
        committing = time.perf_counter()
    return list(range(base + 1, base + 1 + len(rows))), committing


# -- idle connections -----------------------------------------------------------


async def connections_sse(pg: Postgres, quick: bool) -> list[Figure]:
    return await _connections(pg, quick, "sse")


async def connections_ws(pg: Postgres, quick: bool) -> list[Figure]:
    return await _connections(pg, quick, "websocket")


async def _connections(pg: Postgres, quick: bool, kind: str) -> list[Figure]:
    count = 1000 if quick else 10_000
    dsn = await pg.fresh_database()
    async with PulseServer(dsn) as server:
        tok = token("tenant-1", roles=("customer",))
        await asyncio.sleep(0.5)
        before = server.rss()
        counters = [StreamCounter() for _ in range(count)]
        tasks = []
        start = time.perf_counter()
        for i, counter in enumerate(counters):
            coro = (
                counter.sse(server.url, SSE_PATH, tok)
                if kind == "sse"
                else counter.websocket(server.url, f"{WS_PATH}?token={tok}")
            )
            tasks.append(asyncio.create_task(coro))
            if i % 200 == 199:
                await asyncio.gather(*(c.connected.wait() for c in counters[i - 199 : i + 1]))
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in counters)), 120)
        connect_s = time.perf_counter() - start
        failures = [c.failed for c in counters if c.failed]
        await asyncio.sleep(2.0)
        after = server.rss()
        for task in tasks:
            task.cancel()
    per_conn = (after - before) / count
    return [
        Figure(
            f"{count} idle {kind} connections",
            "memory per connection",
            per_conn / 1024,
            "KiB",
            target="<= 40 KB",
            note=f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB; {len(failures)} failed",
        ),
        Figure(f"{count} idle {kind} connections", "connect rate", count / connect_s, "conn/s"),
    ]


# -- a reconnect storm --------------------------------------------------------------


async def reconnect_sse(pg: Postgres, quick: bool) -> list[Figure]:
    """Every dashboard of a tenant back at once after a deploy (issue #20 item 4): SSE
    clients resuming from the tenant's newest id, all connecting together, each
    counted against the per-tenant limit (PULSE_MAX_CONNECTIONS_PER_TENANT) as always."""
    return await _reconnect(pg, quick, "sse")


async def reconnect_sse_tickets(pg: Postgres, quick: bool) -> list[Figure]:
    """The same as the dashboard reconnects: each client takes a one-time ticket
    (POST /api/v1/stream-ticket), then opens its stream with it."""
    return await _reconnect(pg, quick, "tickets")


async def reconnect_ws(pg: Postgres, quick: bool) -> list[Figure]:
    """The same with telemetry WebSockets (``last_event_id`` at the head): a client is
    back when its ``connected`` message arrives, sent once it is admitted."""
    return await _reconnect(pg, quick, "websocket")


async def _reconnect(pg: Postgres, quick: bool, kind: str) -> list[Figure]:
    tickets = kind == "tickets"
    # With tickets, each client makes two requests, and the load generator's share of
    # the two cores (about 1.7 ms per client at 10,000) would be what is measured.
    count = (500 if quick else 2000) if tickets else (1000 if quick else 10_000)
    dsn = await pg.fresh_database()
    conn = await asyncpg.connect(dsn)
    await conn.execute("INSERT INTO tenants (tenant_id) VALUES ('tenant-1')")
    async with conn.transaction():
        base = await conn.fetchval("SELECT pulse_reserve_event_ids('tenant-1', 1000)")
        await conn.execute(
            """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)
               SELECT 'tenant-1', $1 + g, 'dev-00001', now(), '{"temp": 21.5}'
                 FROM generate_series(1, 1000) AS g""",
            base,
        )
    await conn.close()
    newest = base + 1000
    unlimited = {"PULSE_TICKET_RATE_PER_S": "1000000", "PULSE_TICKET_BURST": "1000000"}
    async with PulseServer(dsn, **unlimited) as server:
        tok = token("tenant-1", roles=("customer",))
        ws_path = f"{WS_PATH}?token={tok}&last_event_id={newest}"

        async def take_ticket() -> str | None:
            """A ticket, as the dashboard takes one before each (re)connect; None: a token."""
            if not tickets:
                return None
            conn = await HttpConnection(server.url).open()
            try:
                request = conn.build(
                    "POST", "/api/v1/stream-ticket", headers={"Authorization": f"Bearer {tok}"}
                )
                status, body = await conn.exchange(request)
            finally:
                await conn.close()
            assert status == 200, (status, body[:200])
            ticket: str = orjson.loads(body)["ticket"]
            return ticket

        async def storm() -> tuple[
            list[asyncio.Task[None]], list[float], float, collections.Counter[str], float, float,
            float,
        ]:  # fmt: skip
            """Every client connecting at once: their tasks, connect times, the time
            until all were back, how many failed, and the server's, the load
            generator's and PostgreSQL's CPU per connect."""
            counters = [StreamCounter() for _ in range(count)]
            connect_s: list[float] = []
            async with BackendCpu(dsn) as database:
                tasks, took = await _storm(counters, connect_s)
            failed = collections.Counter(c.failed for c in counters if c.failed)
            return (tasks, connect_s, took[0], failed, took[1] / count, took[2] / count,
                    database.seconds / count)  # fmt: skip

        async def _storm(
            counters: list[StreamCounter], connect_s: list[float]
        ) -> tuple[list[asyncio.Task[None]], tuple[float, float, float]]:
            with cpu_meter(server.pids()) as cpu:
                start = time.perf_counter()

                async def reconnect(counter: StreamCounter) -> None:
                    ticket = await take_ticket()
                    waiting = asyncio.create_task(counter.connected.wait())
                    streaming = asyncio.create_task(
                        counter.websocket(server.url, ws_path, ready=b'"type":"connected"')
                        if kind == "websocket"
                        else counter.sse(
                            server.url, SSE_PATH, tok, last_event_id=newest, ticket=ticket
                        )
                    )
                    await waiting
                    connect_s.append(time.perf_counter() - start)
                    await streaming

                tasks = [asyncio.create_task(reconnect(c)) for c in counters]
                await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in counters)), 120)
                took = time.perf_counter() - start
            return tasks, (took, cpu["others_cpu_s"], cpu["client_cpu_s"])

        tasks, connect_s, took, failed, cpu_per, client_per, pg_per = await storm()
        # A network blip: every client drops at once and comes straight back to the same
        # process, which releases their slots while it admits them again.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tasks, blip_s, blip_took, blip_failed, blip_cpu, _, blip_pg = await storm()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    label = f"{count} SSE clients reconnecting at once (Last-Event-ID at the head)"
    if tickets:
        label = f"{count} SSE clients reconnecting at once, each taking a ticket first"
    if kind == "websocket":
        label = f"{count} telemetry WebSocket clients reconnecting at once (at the head)"
    blip = f"the same {count} dropping and coming back at once to the same process"
    if tickets:
        blip += ", with new tickets"
    return [
        Figure(label, "all back", took, "s", target="<= 5 s" if count == 10_000 else "",
               note=f"{count / took:.0f} conn/s; {_failures(failed)}"),
        Figure(label, "connect p50", percentile(connect_s, 50), "s"),
        Figure(label, "connect p99", percentile(connect_s, 99), "s"),
        Figure(label, "server CPU per connect", cpu_per * 1e6, "µs",
               note=f"load generator {client_per * 1e6:.0f} µs per connect"),
        Figure(label, "PostgreSQL CPU per connect", pg_per * 1e6, "µs"),
        Figure(blip, "all back", blip_took, "s",
               note=f"{count / blip_took:.0f} conn/s; {_failures(blip_failed)}; "
               f"p50 {percentile(blip_s, 50):.1f} s, p99 {percentile(blip_s, 99):.1f} s"),
        Figure(blip, "server CPU per reconnect", blip_cpu * 1e6, "µs",
               note=f"its release and its admission; PostgreSQL {blip_pg * 1e6:.0f} µs"),
    ]  # fmt: skip


def _failures(failed: collections.Counter[str]) -> str:
    """How many failed, and the commonest reason."""
    if not failed:
        return "0 failed"
    (reason, n), *_ = failed.most_common(1)
    return f"{failed.total()} failed ({n}: {reason})"


# -- replay ---------------------------------------------------------------------


async def replay(pg: Postgres, quick: bool) -> list[Figure]:
    rows = 100_000 if quick else 1_000_000
    dsn = await pg.fresh_database()
    conn = await asyncpg.connect(dsn)
    await conn.execute("INSERT INTO tenants (tenant_id) VALUES ('tenant-1')")
    async with conn.transaction():
        base = await conn.fetchval("SELECT pulse_reserve_event_ids('tenant-1', $1)", rows)
        await conn.execute(
            """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)
               SELECT 'tenant-1', $1 + g, 'dev-' || lpad((g % 25)::text, 5, '0'), now(),
                      jsonb_build_object('temp', round((random() * 30)::numeric, 2),
                                         'hum', round((random() * 80)::numeric, 1))
                 FROM generate_series(1, $2) AS g""",
            base,
            rows,
        )
    await conn.execute("VACUUM ANALYZE telemetry")
    # Counted already, as live ingest is within a second: otherwise the rollups' backfill
    # of the million rows would run beside the replay, and be measured with it.
    await conn.execute(
        """INSERT INTO rollup_watermarks (tenant_id, last_id)
           SELECT tenant_id, last_event_id FROM tenants"""
    )
    await conn.close()
    async with PulseServer(dsn) as server:
        counter = StreamCounter()
        tok = token("tenant-1", roles=("customer",))
        with cpu_meter(server.pids()) as cpu:
            task = asyncio.create_task(counter.sse(server.url, SSE_PATH, tok, last_event_id=0))
            give_up = time.perf_counter() + 120
            while counter.events < rows and not task.done() and time.perf_counter() < give_up:
                await asyncio.sleep(0.02)
            task.cancel()
    return [
        Figure(
            f"replay {rows:,} events over SSE",
            "replay rate",
            counter.events / cpu["wall_s"],
            "events/s",
            target=">= 100,000",
            note=f"server CPU {cpu['others_cpu_s']:.1f}s, client CPU {cpu['client_cpu_s']:.1f}s "
            f"in {cpu['wall_s']:.1f}s",
        )
    ]


# -- a cluster: every process a listener (LISTEN) against one relay (NATS) ----------------


async def cluster(pg: Postgres, quick: bool) -> list[Figure]:
    """N server processes x M SSE subscribers each, on one database, in both modes.

    LISTEN: every process listens and reads each event from the table. NATS
    (PULSE_BUS_URL): one relay listens, reads each event once and publishes it;
    the processes deliver from the messages. Measured for each: the listening
    backends, PostgreSQL's CPU per committed event (the commit included: the
    same in both modes), deliveries/s and commit-to-client latency.
    """
    if nats_server_binary() is None:
        print("   skipped: nats-server is not installed (apt-get install nats-server)")
        return []
    per_process = 100 if quick else 500
    process_counts = (2,) if quick else (1, 4)
    rate, seconds = 20, (3.0 if quick else 8.0)
    runs: dict[tuple[str, int], tuple[Deliveries, int, float, float]] = {}
    async with NatsProcess() as nats:
        for processes in process_counts:
            modes = ["listen", "nats"] + (["nats, dedicated relay"] if processes > 2 else [])
            for mode in modes:
                runs[mode, processes] = await _cluster_run(
                    pg, nats, mode, processes, per_process, rate, seconds
                )
    figures = []
    for (mode, processes), (d, listeners, fan_out_s, pg_all_s) in runs.items():
        label = f"cluster {mode}, {processes} x {per_process} subscribers, {rate} events/s"
        nats_mode = mode.startswith("nats")
        listen_d, _, listen_fan_out_s, _ = runs["listen", processes]
        listen_p99 = percentile(listen_d.latencies, 99)
        per_event = fan_out_s / max(1, d.events)
        figures += [
            Figure(label, "listening Postgres backends", listeners, "backends",
                   target="1 with NATS" if nats_mode else ""),
            Figure(
                label, "Postgres CPU per event, fan-out", per_event * 1e6, "µs",
                target="NATS: flat as processes grow" if nats_mode else "",
                baseline=listen_fan_out_s / max(1, listen_d.events) * 1e6
                if nats_mode else None,
                note=f"the servers' backends, less their idle work; "
                f"{fan_out_s / max(1, d.delivered) * 1e9:.0f} ns per delivery; all of "
                f"Postgres (commits and idle work too) "
                f"{pg_all_s / max(1, d.events) * 1e6:.0f} µs per event",
            ),
            Figure(
                label, "deliveries", d.delivered / seconds, "events/s",
                note=f"{d.delivered}/{d.expected} delivered; servers CPU "
                f"{d.cpu['others_cpu_s'] / d.cpu['wall_s']:.0%}, client CPU "
                f"{d.cpu['client_cpu_s'] / d.cpu['wall_s']:.0%}",
            ),
            Figure(
                label, "commit-to-client latency p50 / p99",
                percentile(d.latencies, 50) * 1e3, "ms",
                target="NATS: p99 within 10 of LISTEN" if nats_mode else "",
                note=f"p99 {percentile(d.latencies, 99) * 1e3:.1f} ms"
                + (f" (LISTEN p99 {listen_p99 * 1e3:.1f} ms); " if nats_mode else "")
                + ", ".join(f"{k} {v:.1f}" if k.endswith("ms") else f"{k} {v:.0f}"
                            for k, v in d.bus.items()),
            ),
        ]  # fmt: skip
    return figures


async def _cluster_run(
    pg: Postgres,
    nats: NatsProcess,
    mode: str,
    processes: int,
    per_process: int,
    rate: int,
    seconds: float,
) -> tuple[Deliveries, int, float, float]:
    """One mode: deliveries, listening backends, and PostgreSQL's CPU seconds: of the
    servers' backends (the fan-out: LISTEN, reading the rows) and of all its processes.

    "nats, dedicated relay": one more process, with no subscriber, is the relay; the
    others never compete for it (PULSE_BUS_RELAY=0)."""
    dsn = await pg.fresh_database()
    env = {"PULSE_BUS_URL": nats.url} if mode.startswith("nats") else {}
    tok = token("tenant-1", roles=("customer",))
    async with contextlib.AsyncExitStack() as stack:
        relays = []
        if mode == "nats, dedicated relay":
            relays.append(await stack.enter_async_context(PulseServer(dsn, **env)))
            env = {**env, "PULSE_BUS_RELAY": "0"}
        servers = []
        for _ in range(processes):
            servers.append(await stack.enter_async_context(PulseServer(dsn, **env)))
        if env:
            await _all_on_bus(relays + servers)
        devices = sorted(await provision(servers[0].url, "tenant-1", 25))
        counters: list[StreamCounter] = []
        for server in servers:
            counters += await stack.enter_async_context(
                _subscribers(server.url, "sse", SSE_PATH, tok, per_process)
            )
        listeners = await listening_backends(dsn)
        pids = [pid for server in relays + servers for pid in server.pids()]
        pg_pids = pg.pids()
        # What the servers' backends spend with nothing committed (the sweeper, the
        # leases, the relay's standbys): taken off, so that what is left is the fan-out.
        async with BackendCpu(dsn) as idle:
            await asyncio.sleep(seconds + 1.0)
        probe = await _nats_probe(nats, dsn, seconds + 3) if env else None
        pg_before = processes_cpu_s(pg_pids)
        async with BackendCpu(dsn) as busy:
            d = await _measure_deliveries(dsn, counters, devices, rate, seconds, pids, bare=False)
        pg_all = processes_cpu_s(pg_pids) - pg_before
        d.bus = await _bus_counters(relays + servers) if env else {}
        if probe is not None:
            assert probe.stdout is not None
            arrived = orjson.loads(await asyncio.wait_for(probe.stdout.readline(), 60))
            await probe.wait()
            on_nats = [t - d.committed_at[int(i)] for i, t in arrived.items()
                       if int(i) in d.committed_at]  # fmt: skip
            d.bus["commit-to-NATS p50 ms"] = percentile(on_nats, 50) * 1e3
            d.bus["p99 ms"] = percentile(on_nats, 99) * 1e3
    return d, listeners, max(0.0, busy.seconds - idle.seconds), pg_all


async def _nats_probe(nats: NatsProcess, dsn: str, seconds: float) -> asyncio.subprocess.Process:
    """benchmarks/nats_probe.py on the tenant's subject: when the relay's messages land."""
    conn = await asyncpg.connect(dsn)
    database = await conn.fetchval("SELECT pulse_bus_database_id()")
    await conn.close()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.nats_probe", nats.url,
        f"pulse.{database}.t.tenant-1", str(seconds),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readline(), 30)
    return proc


async def _bus_counters(servers: list[PulseServer]) -> dict[str, float]:
    """The bus's counters summed over the servers: what went on besides the messages."""
    names = ("pulse_bus_fallbacks_total", "pulse_bus_gaps_filled_total", "pulse_bus_resyncs_total")
    totals = dict.fromkeys(names, 0.0)
    async with httpx.AsyncClient(timeout=10) as http:
        for server in servers:
            for line in (await http.get(server.url + "/metrics")).text.splitlines():
                name = line.split("{")[0].split(" ")[0]
                if name in totals:
                    totals[name] += float(line.split()[-1])
    return {name.removeprefix("pulse_bus_").removesuffix("_total"): v for name, v in totals.items()}


async def _all_on_bus(servers: list[PulseServer], timeout: float = 20) -> None:
    """Until every process is on NATS (not falling back) and one of them relays."""
    async with httpx.AsyncClient(timeout=5) as http:
        async with asyncio.timeout(timeout):
            while True:
                buses = [
                    (await http.get(s.url + "/api/v1/telemetry/stream/status")).json()["bus"]
                    for s in servers
                ]
                if all(b["connected"] and not b["fallback"] for b in buses) and any(
                    b["relay"] for b in buses
                ):
                    return
                await asyncio.sleep(0.1)


# -- the cost on ingest of the relay's database-wide channel ------------------------------

# The telemetry trigger before migration 0006: one notification, on the tenant's channel.
_ONE_NOTIFY = """
CREATE OR REPLACE FUNCTION pulse_notify_telemetry() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
    FOR r IN SELECT tenant_id, min(id) AS first_id, max(id) AS last_id
               FROM new_rows GROUP BY tenant_id LOOP
        PERFORM pg_notify(pulse_channel(r.tenant_id),
            json_build_object('kind', 'telemetry', 'tenant', r.tenant_id,
                              'first', r.first_id, 'last', r.last_id)::text);
    END LOOP;
    RETURN NULL;
END $$;
"""


async def notify_cost(pg: Postgres, quick: bool) -> list[Figure]:
    """Notifying commits/s with the telemetry trigger of 0006 (the tenant's channel and the
    bus channel) against the one before it (the tenant's channel only): 4 writers, 4
    tenants, one row per commit, a listener on every channel (as a relay and a process
    would have). The two triggers take turns on the same database, a second at a time, so
    that a busy machine weighs on both alike; commits are asynchronous (no fsync wait), so
    that what is compared is the work the notifications add."""
    rounds = 3 if quick else 10
    dsn = await pg.fresh_database()
    setup = await asyncpg.connect(dsn)
    two_notify = await setup.fetchval(
        "SELECT pg_get_functiondef('pulse_notify_telemetry'::regproc)"
    )
    tenants = [f"tenant-{i}" for i in range(4)]
    await setup.executemany("INSERT INTO tenants (tenant_id) VALUES ($1)", [(t,) for t in tenants])
    listener = await asyncpg.connect(dsn)
    for channel in ["pulse_v1_bus"] + [
        await listener.fetchval("SELECT pulse_channel($1)", t) for t in tenants
    ]:
        await listener.add_listener(channel, lambda *_: None)
    writers = [
        await asyncpg.connect(dsn, server_settings={"synchronous_commit": "off"}) for _ in tenants
    ]

    async def write(conn: asyncpg.Connection, tenant: str, stop: float) -> int:
        rng = random.Random(tenant)
        commits = 0
        while time.perf_counter() < stop:
            await _commit_readings(conn, tenant, [("dev-1", _reading(rng))])
            commits += 1
        return commits

    rates: dict[str, list[float]] = {"one": [], "two": []}
    for _ in range(rounds):
        for variant, definition in (("one", _ONE_NOTIFY), ("two", two_notify)):
            await setup.execute(definition)
            started = time.perf_counter()
            counts = await asyncio.gather(
                *(write(c, t, started + 1.0) for c, t in zip(writers, tenants, strict=True))
            )
            rates[variant].append(sum(counts) / (time.perf_counter() - started))
    for conn in [*writers, listener, setup]:
        await conn.close()
    one, two = statistics.median(rates["one"]), statistics.median(rates["two"])
    label = "notifying commits, 4 writers, 1 row each"
    return [
        Figure(label, "one notification (before 0006)", one, "commits/s",
               note=f"median of {rounds} one-second turns"),
        Figure(label, "with the bus channel (0006)", two, "commits/s", baseline=one,
               note=f"median of {rounds}, in turn with the above; "
               f"{(1 / two - 1 / one) * 1e6:+.1f} µs per commit"),
    ]  # fmt: skip


SCENARIOS: dict[str, Scenario] = {
    "ingest": ingest_batch,
    "ingest-workers": ingest_batch_workers,
    "ingest-gateways": ingest_gateways,
    "single": ingest_single,
    "single-workers": ingest_single_workers,
    "fanout-sse": fanout_sse,
    "fanout-ws": fanout_ws,
    "fanout-workers": fanout_workers,
    "connections-sse": connections_sse,
    "connections-ws": connections_ws,
    "reconnect-sse": reconnect_sse,
    "reconnect-sse-tickets": reconnect_sse_tickets,
    "reconnect-ws": reconnect_ws,
    "replay": replay,
    "stuck-readers": stuck_readers,
    "cluster": cluster,
    "notify-cost": notify_cost,
    "mqtt": mqtt_ingest,
    "history": history,
}
