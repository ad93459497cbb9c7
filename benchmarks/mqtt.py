"""Ingest over MQTT beside HTTP, on one server and one broker in one run: rows/s (MQTT,
HTTP batches, HTTP single readings) and publish-to-client latency (MQTT, HTTP single)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
import time
from collections.abc import AsyncGenerator
from pathlib import Path

import asyncpg
import httpx
import orjson

from benchmarks.harness import Figure, Postgres, PulseServer, percentile, provision, token
from benchmarks.loadgen import HttpConnection, post_batches
from pulse.sim.broker import Mosquitto, mosquitto_binaries

TENANT = "tenant-1"
SSE_PATH = "/api/v1/customer/telemetry/stream/sse"
STATUS = "/api/v1/telemetry/stream/status"
PUBLISHERS = 4  # MQTT devices publishing as fast as they can, one mosquitto_pub each
SINGLE_CLIENTS = 64
PACED_RATE = 100  # readings/s for the latency runs


async def mqtt_ingest(pg: Postgres, quick: bool) -> list[Figure]:
    if mosquitto_binaries() is None or shutil.which("mosquitto_pub") is None:
        print(
            "   skipped: needs mosquitto and mosquitto_pub "
            "(apt-get install mosquitto mosquitto-clients)",
            flush=True,
        )
        return []
    seconds = 4.0 if quick else 15.0
    dsn = await pg.fresh_database()
    with tempfile.TemporaryDirectory(prefix="pulse-bench-mqtt-") as folder:
        broker = Mosquitto(Path(folder))
        await broker.start()
        try:
            env = {"PULSE_MQTT_URL": broker.url, "PULSE_MQTT_CLIENT_ID": "pulse-bench"}
            async with PulseServer(dsn, **env) as server:
                await _until_mqtt_ready(server.url)
                devices = await provision(server.url, TENANT, SINGLE_CLIENTS)
                pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
                assert pool is not None
                try:
                    return await _measure(server, broker, devices, pool, seconds)
                finally:
                    await pool.close()
        finally:
            await broker.stop()


async def _measure(
    server: PulseServer,
    broker: Mosquitto,
    devices: dict[str, str],
    pool: asyncpg.Pool,
    seconds: float,
) -> list[Figure]:
    per_publisher = 2500 if seconds < 10 else 25_000
    mqtt_rate, offered = await _mqtt_rows(broker, devices, pool, per_publisher)
    batch_rate = await _batch_rows(server.url, devices, seconds)
    single_rate = await _single_rows(server.url, devices, seconds)
    paced = _publish_paced(broker, devices, pool)
    mqtt_latency = await _latencies(server.url, paced, await _count(pool), seconds)
    posted = _post_paced(server.url, devices)
    http_latency = await _latencies(server.url, posted, await _count(pool), seconds)
    scenario = "ingest, MQTT beside HTTP"

    def spread(values: list[float]) -> str:
        return f"p99 {percentile(values, 99) * 1e3:.1f} ms, {len(values)} events"

    return [
        Figure(scenario, "HTTP batch ingest", batch_rate, "rows/s", note="4 clients x 500"),
        Figure(
            scenario,
            "HTTP single-reading ingest",
            single_rate,
            "rows/s",
            note=f"{SINGLE_CLIENTS} clients, one request in flight each",
        ),
        Figure(
            scenario,
            "MQTT ingest (QoS 1, acknowledged after commit)",
            mqtt_rate,
            "rows/s",
            baseline=single_rate,
            note=f"{PUBLISHERS} mosquitto_pub x {per_publisher} readings, published at "
            f"{offered:,.0f}/s; first publish to last commit",
        ),
        Figure(
            scenario,
            "HTTP single reading: POST-to-client latency p50",
            percentile(http_latency, 50) * 1e3,
            "ms",
            note=f"{PACED_RATE}/s over SSE; {spread(http_latency)}",
        ),
        Figure(
            scenario,
            "MQTT: publish-to-client latency p50",
            percentile(mqtt_latency, 50) * 1e3,
            "ms",
            note=f"{PACED_RATE}/s over SSE; {spread(mqtt_latency)}",
        ),
    ]


async def _until_mqtt_ready(url: str) -> None:
    async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(30):
        while True:
            mqtt = (await http.get(STATUS)).json().get("mqtt") or {}
            if mqtt.get("subscribed") and mqtt.get("synced"):
                return
            await asyncio.sleep(0.05)


async def _count(pool: asyncpg.Pool) -> int:
    query = "SELECT last_event_id FROM tenants WHERE tenant_id = $1"
    return int(await pool.fetchval(query, TENANT))


async def _mqtt_rows(
    broker: Mosquitto, devices: dict[str, str], pool: asyncpg.Pool, per_publisher: int
) -> tuple[float, float]:
    """Rows/s from the first publish until every reading is committed, with PUBLISHERS
    devices each publishing ``per_publisher`` readings as fast as mosquitto_pub (C, one
    process per device, QoS 1) can; and the rate at which they were published."""
    rng = random.Random(4)
    publishers = list(devices.items())[:PUBLISHERS]
    with tempfile.TemporaryDirectory(prefix="pulse-bench-lines-") as folder:
        files = []
        for device_id, _ in publishers:
            path = Path(folder) / device_id
            path.write_bytes(
                b"\n".join(
                    orjson.dumps({"metrics": _reading(rng), "seq": seq})
                    for seq in range(per_publisher)
                )
                + b"\n"
            )
            files.append(path)
        before = await _count(pool)
        start = time.perf_counter()
        processes = []
        for (device_id, device_token), path in zip(publishers, files, strict=True):
            with path.open("rb") as lines:
                processes.append(
                    await asyncio.create_subprocess_exec(
                        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port),
                        "-V", "mqttv5", "-q", "1", "-l", "-i", f"{TENANT}/{device_id}",
                        "-u", f"{TENANT}/{device_id}", "-P", device_token,
                        "-t", f"pulse/{TENANT}/{device_id}/telemetry",
                        stdin=lines,
                    )
                )  # fmt: skip
        for process in processes:
            assert await process.wait() == 0, "mosquitto_pub failed"
        published = time.perf_counter() - start
        total = per_publisher * len(publishers)
        async with asyncio.timeout(300):
            while await _count(pool) < before + total:
                await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - start
    return total / elapsed, total / published


async def _batch_rows(url: str, devices: dict[str, str], seconds: float) -> float:
    rng = random.Random(5)
    bodies = [
        orjson.dumps(
            {
                "messages": [
                    {
                        "tenant_id": TENANT,
                        "device_id": device_id,
                        "provision_token": device_token,
                        "metrics": _reading(rng),
                    }
                    for device_id, device_token in rng.choices(list(devices.items()), k=500)
                ]
            }
        )
        for _ in range(8)
    ]
    start = time.perf_counter()
    rows = await asyncio.gather(*(post_batches(url, bodies, start + seconds) for _ in range(4)))
    return sum(rows) / (time.perf_counter() - start)


async def _single_rows(url: str, devices: dict[str, str], seconds: float) -> float:
    rows = 0

    async def client(device_id: str, device_token: str, stop: float) -> None:
        nonlocal rows
        conn = await HttpConnection(url).open()
        rng = random.Random(device_id)
        path = f"/ingest/v1/tenant/{TENANT}/device/{device_id}/telemetry"
        while time.perf_counter() < stop:
            body = orjson.dumps({"metrics": _reading(rng)})
            request = conn.build("POST", path, body, {"X-Provision-Token": device_token})
            status, payload = await conn.exchange(request)
            assert status == 201, (status, payload[:200])
            rows += 1
        await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(d, t, start + seconds) for d, t in devices.items()))
    return rows / (time.perf_counter() - start)


async def _publish_paced(
    broker: Mosquitto, devices: dict[str, str], pool: asyncpg.Pool
) -> AsyncGenerator[None, None]:
    """Each step publishes one reading stamped with its send time (metric ``t``), through
    one mosquitto_pub that publishes each line it reads (the load generator's own
    threads and GIL stay out of the measure). Its first line, a reading the stream's
    metric filter leaves out, is stored before the first step: mosquitto_pub connects
    after it starts, and the lines written meanwhile would wait (up to 160 ms)."""
    device_id, device_token = next(iter(devices.items()))
    publisher = await asyncio.create_subprocess_exec(
        "mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "mqttv5", "-q", "1",
        "-l", "-i", f"{TENANT}/{device_id}", "-u", f"{TENANT}/{device_id}", "-P", device_token,
        "-t", f"pulse/{TENANT}/{device_id}/telemetry",
        stdin=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert publisher.stdin is not None
    try:
        before = await _count(pool)
        publisher.stdin.write(b'{"metrics": {"warm_up": 1}}\n')
        async with asyncio.timeout(30):
            while await _count(pool) == before:
                await asyncio.sleep(0.01)
        while True:
            publisher.stdin.write(orjson.dumps({"metrics": {"t": time.time()}}) + b"\n")
            await publisher.stdin.drain()
            yield
    finally:
        publisher.stdin.close()
        await publisher.wait()


async def _post_paced(url: str, devices: dict[str, str]) -> AsyncGenerator[None, None]:
    """Each step posts one reading stamped with its send time (metric ``t``, wall clock)."""
    device_id, device_token = next(iter(devices.items()))
    path = f"/ingest/v1/tenant/{TENANT}/device/{device_id}/telemetry"
    conn = await HttpConnection(url).open()
    try:
        while True:
            body = orjson.dumps({"metrics": {"t": time.time()}})
            request = conn.build("POST", path, body, {"X-Provision-Token": device_token})
            status, _ = await conn.exchange(request)
            assert status == 201
            yield
    finally:
        await conn.close()


async def _latencies(
    url: str, sender: AsyncGenerator[None, None], after: int, seconds: float
) -> list[float]:
    """Send PACED_RATE readings/s with ``sender`` while an SSE client, resuming after event
    ``after`` (so none is missed while it subscribes), receives them: each one's
    send-to-receive time (by the wall clock: the senders run in other processes)."""
    latencies: list[float] = []
    ready = asyncio.Event()

    async def receive() -> None:
        headers = {
            "Authorization": f"Bearer {token(TENANT, ('customer',))}",
            "Last-Event-ID": str(after),
        }
        async with (
            httpx.AsyncClient(base_url=url, timeout=None) as http,
            http.stream("GET", SSE_PATH, headers=headers, params={"metric": "t"}) as response,
        ):
            ready.set()
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    sent = orjson.loads(line[6:])["data"]["metrics"]["t"]
                    latencies.append(time.time() - sent)

    receiving = asyncio.create_task(receive())
    await ready.wait()
    start = time.perf_counter()
    n = 0
    try:
        async for _ in sender:
            n += 1
            if n >= PACED_RATE * seconds:
                break
            await asyncio.sleep(max(0.0, start + n / PACED_RATE - time.perf_counter()))
        async with asyncio.timeout(10):
            while len(latencies) < n:
                await asyncio.sleep(0.01)
    finally:
        receiving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        await sender.aclose()
    return latencies


def _reading(rng: random.Random) -> dict[str, float]:
    return {"temp": round(rng.uniform(15, 30), 2), "hum": round(rng.uniform(20, 80), 1)}
