"""Three `pulse serve` processes on one database and one NATS (PULSE_BUS_URL), ingest spread
over all three, streams of every kind: the relay SIGKILLed mid-stream, NATS restarted
mid-stream, an edge restarted. Every stream gets every event exactly once, in order; a
stream on a process that stays up sees no error at all; another process takes over as
relay within 5 s; and the database has one listener, not three."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.streams.sse_client import ResumingClient
from tests.streams.ws_support import V2_PATH, WS_PATH, open_ws, recv, request, ws_url
from tests.support import (
    NatsServer,
    ServeProcess,
    free_port,
    metric,
    provision_device,
    start_serve,
    until,
)

pytestmark = pytest.mark.timeout(240)

STATUS = "/api/v1/telemetry/stream/status"
DEVICES = ("d1", "d2", "d3")
TAKEOVER_LIMIT_S = 5.0


class Cluster:
    """Three processes on fixed ports, so that one restarted keeps its URL."""

    def __init__(self, tmp_path: Path, database_url: str, nats: NatsServer) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.env = {
            "PULSE_BUS_URL": nats.url,
            "PULSE_SSE_KEEPALIVE_S": "0.3",
            "PULSE_INGEST_BURST_PER_DEVICE": "100000",
            "PULSE_INGEST_RATE_PER_DEVICE": "100000",
            "PULSE_SHUTDOWN_TIMEOUT_S": "3",
            "PULSE_LISTENER_BACKOFF_MAX_S": "0.3",
        }
        self.ports = {name: free_port() for name in "abc"}
        self.processes: dict[str, ServeProcess] = {}
        self.stderr = b""

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def urls(self) -> list[str]:
        return [self.url(name) for name in "abc"]

    async def start(self, name: str) -> None:
        process = await start_serve(
            data_dir=self.tmp_path / name,
            database_url=self.database_url,
            env=self.env,
            port=self.ports[name],
        )
        self.processes[name] = process
        await process.wait_ready()

    async def stop(self, name: str) -> None:
        process = self.processes.pop(name)
        await process.stop()
        self.stderr += process.stderr

    async def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        process.kill()
        await process.stop()
        self.stderr += process.stderr

    async def close(self) -> None:
        for name in list(self.processes):
            await self.stop(name)

    async def bus(self, name: str) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as http:
            return dict((await http.get(self.url(name) + STATUS)).json()["bus"])

    async def relay(self) -> str | None:
        """The process that relays, if one does (asking each live process)."""
        for name in self.processes:
            with contextlib.suppress(httpx.HTTPError):
                if (await self.bus(name))["relay"]:
                    return name
        return None

    async def all_on_bus(self) -> bool:
        for name in self.processes:
            try:
                bus = await self.bus(name)
            except httpx.HTTPError:
                return False
            if not bus["connected"] or bus["fallback"]:
                return False
        return await self.relay() is not None


async def wait_for(check: Callable[[], Any], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110  polling other processes over HTTP
            await asyncio.sleep(0.05)


class Writers:
    """Ingest spread over every process: each writer posts to the next URL in turn, and
    moves on when one fails (a request that failed may or may not have committed: the
    table is the reference)."""

    def __init__(self, urls: list[str], tokens: dict[str, str]) -> None:
        self.urls = urls
        self.tokens = tokens
        self.acknowledged: dict[str, int] = {url: 0 for url in urls}
        self.stop = asyncio.Event()

    async def run(self, index: int) -> None:
        targets = itertools.cycle(self.urls[index:] + self.urls[:index])
        devices = itertools.cycle(DEVICES)
        async with httpx.AsyncClient(timeout=10) as http:
            while not self.stop.is_set():
                url, device = next(targets), next(devices)
                try:
                    r = await http.post(
                        f"{url}/ingest/v1/tenant/t1/device/{device}/telemetry",
                        headers={"X-Provision-Token": self.tokens[device]},
                        json={"metrics": {"v": 1}},
                    )
                except httpx.TransportError:
                    await asyncio.sleep(0.02)
                    continue
                if r.status_code == 201:
                    self.acknowledged[url] += 1
                await asyncio.sleep(0.01)


class FailoverWs:
    """A telemetry WebSocket client that resumes from its last id, on the next process
    when one goes away, and keeps every id it received."""

    def __init__(self, urls: list[str], token: str) -> None:
        self.urls = list(urls)
        self.token = token
        self.last_id = 0
        self.ids: list[int] = []
        self.connections = 0

    async def run(self, done: Callable[[], bool]) -> None:
        while not done():
            self.connections += 1
            url = ws_url(self.urls[0], WS_PATH, token=self.token, last_event_id=self.last_id)
            with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
                async with connect(url, open_timeout=5, close_timeout=1) as ws:
                    assert json.loads(await ws.recv())["type"] == "connected"
                    async for data in ws:
                        message = json.loads(data)
                        if message["type"] == "telemetry":
                            assert message["id"] > self.last_id, (message["id"], self.last_id)
                            self.ids.append(message["id"])
                            self.last_id = message["id"]
                        if done():
                            return
            self.urls.append(self.urls.pop(0))
            await asyncio.sleep(0.05)


async def v2_reader(url: str, token: str, ids: list[int], done: Callable[[], bool]) -> None:
    """The legacy v2 WebSocket (no resume): every event of the subscribed devices."""
    async with open_ws(url, V2_PATH, token=token) as ws:
        for device in DEVICES:
            await request(ws, {"action": "subscribe", "type": "device", "device_id": device})
        while not done():
            try:
                message = await recv(ws, timeout=0.5)
            except TimeoutError:
                continue  # nothing new: is it done?
            if message["type"] == "telemetry":
                ids.append(message["id"])


async def test_exactly_once_across_relay_kill_nats_restart_and_edge_restart(
    database_url: str,
    pool: asyncpg.Pool,
    tmp_path: Path,
    make_token: Callable[..., str],
    nats_server: NatsServer,
) -> None:
    tokens = {device: await provision_device(pool, "t1", device) for device in DEVICES}
    token = make_token("t1")
    cluster = Cluster(tmp_path, database_url, nats_server)
    try:
        await cluster.start("a")  # first up: the relay
        await wait_for(lambda: _is(cluster.relay(), "a"), 10)
        await cluster.start("b")
        await cluster.start("c")
        await wait_for(cluster.all_on_bus, 15)
        # One listening backend for three processes, and one connection for each job
        # one process does for all (the others stand by without one).
        await wait_for(lambda: _listeners_are(pool, 1), 10)
        await wait_for(lambda: _one_connection_per_job(pool), 10)

        final: list[int] = []

        def caught_up(last_id: int | None) -> bool:
            return bool(final) and (last_id or 0) >= final[0]

        # SSE: one that drops and resumes at random over every process, one that stays
        # on c (never stopped) from start to end; the telemetry WebSocket, resuming over
        # every process (it starts on a, the relay, killed below); v2 on c.
        roaming = ResumingClient(cluster.url("a"), token, seed=1)
        steady = ResumingClient(cluster.url("c"), token, seed=2)
        ws = FailoverWs([cluster.url(n) for n in "abc"], token)
        v2_ids: list[int] = []
        readers = [
            asyncio.create_task(
                roaming.run(
                    lambda c: caught_up(c.last_id),
                    drop_after=(20, 80),
                    fallback_urls=(cluster.url("b"), cluster.url("c")),
                )
            ),
            asyncio.create_task(
                steady.run(lambda c: caught_up(c.last_id), drop_after=(10**6, 10**6))
            ),
            asyncio.create_task(ws.run(lambda: caught_up(ws.last_id))),
            asyncio.create_task(
                v2_reader(
                    cluster.url("c"),
                    token,
                    v2_ids,
                    lambda: caught_up(v2_ids[-1] if v2_ids else None),
                )
            ),
        ]
        writers = Writers(cluster.urls, tokens)
        writing = [asyncio.create_task(writers.run(i)) for i in range(3)]

        async def progress(events: int) -> None:
            """Until the steady stream has received ``events`` more."""
            target = len(steady.ids) + events
            await until(lambda: len(steady.ids) >= target, timeout=30)

        await progress(60)
        # A process is subscribed to the tenant it serves (a and c have its streams, b
        # none yet), and to nothing else but the relay's heartbeats.
        database = await pool.fetchval("SELECT pulse_bus_database_id()")
        relay_subject, t1 = f"pulse.{database}.relay", f"pulse.{database}.t.t1"
        subscriptions = {
            name.rsplit(":", 1)[-1]: subjects
            for name, subjects in (await nats_server.subscriptions()).items()
        }
        assert {
            name: subscriptions[str(process.proc.pid)]
            for name, process in cluster.processes.items()
        } == {"a": {relay_subject, t1}, "b": {relay_subject}, "c": {relay_subject, t1}}

        # 1. The relay is SIGKILLed mid-stream; another process takes over.
        await cluster.kill("a")
        killed = time.monotonic()
        await wait_for(lambda: _some(cluster.relay()), TAKEOVER_LIMIT_S + 5)
        takeover_s = time.monotonic() - killed
        assert takeover_s <= TAKEOVER_LIMIT_S, takeover_s
        await progress(60)
        await cluster.start("a")  # back, as an edge
        await progress(40)

        # 2. NATS restarted mid-stream: every process falls back to LISTEN, then returns.
        await nats_server.stop()
        stopped = time.monotonic()
        await wait_for(lambda: _any_falls_back(cluster), 10)
        fallback_s = time.monotonic() - stopped
        await progress(40)  # delivered while NATS is away
        await nats_server.start()
        await wait_for(cluster.all_on_bus, 20)
        await progress(40)

        # 3. An edge restarted (SIGTERM, then started again on its port).
        relay = await cluster.relay()
        edge = next(n for n in "ab" if n != relay)
        await cluster.stop(edge)
        await progress(30)
        await cluster.start(edge)
        await wait_for(cluster.all_on_bus, 15)
        await progress(40)

        writers.stop.set()
        await asyncio.gather(*writing)
        final.append(
            await pool.fetchval("SELECT last_event_id FROM tenants WHERE tenant_id = 't1'")
        )
        try:
            await asyncio.wait_for(asyncio.gather(*readers), 60)
        except TimeoutError:
            v2_gaps = [(a, b) for a, b in itertools.pairwise(v2_ids) if b != a + 1]
            raise AssertionError(
                f"final {final}, roaming {roaming.last_id}, steady {steady.last_id}, "
                f"ws {ws.last_id}, v2 {v2_ids[-1:]} gaps {v2_gaps[:5]}"
            ) from None
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(cluster.url("c") + "/metrics")).text
        await wait_for(lambda: _listeners_are(pool, 1), 10)
    finally:
        await cluster.close()

    stored = [r["id"] for r in await pool.fetch("SELECT id FROM telemetry ORDER BY id")]
    assert stored == list(range(1, len(stored) + 1))
    # Ingest went through every process.
    assert all(count > 0 for count in writers.acknowledged.values()), writers.acknowledged
    # Exactly once, in order, for every stream.
    assert roaming.ids == stored
    assert ws.ids == stored
    assert steady.ids == stored
    assert steady.connections == 1  # it saw no error and never had to reconnect
    assert v2_ids == list(range(v2_ids[0], stored[-1] + 1))  # from its start, no gap
    assert roaming.connections > 3 and ws.connections > 1
    # c read gaps from the table (the relay's death, NATS away) and fell back once.
    assert metric(metrics, "pulse_bus_fallbacks_total") >= 1
    assert metric(metrics, 'pulse_bus_messages_received_total{kind="events"}') > 0
    assert b"Traceback" not in cluster.stderr, cluster.stderr.decode(errors="replace")[-3000:]
    print(
        f"relay takeover after {takeover_s:.2f} s; fallback {fallback_s:.2f} s after NATS "
        f"stopped; {len(stored)} events; acknowledged per "
        f"process {sorted(writers.acknowledged.values())}; "
        f"gaps filled on c {metric(metrics, 'pulse_bus_gaps_filled_total'):.0f}"
    )


async def _is(name: Any, expected: str) -> bool:
    return bool(await name == expected)


async def _some(name: Any) -> bool:
    return await name is not None


async def _any_falls_back(cluster: Cluster) -> bool:
    for name in cluster.processes:
        with contextlib.suppress(httpx.HTTPError):
            if (await cluster.bus(name))["fallback"]:
                return True
    return False


async def _listeners_are(pool: asyncpg.Pool, count: int) -> bool:
    return count == await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'pulse listener'"
    )


async def _one_connection_per_job(pool: asyncpg.Pool) -> bool:
    rows = await pool.fetch(
        "SELECT application_name, count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name IN "
        "('pulse rollups', 'pulse rollups standby', 'pulse sweeper', 'pulse relay standby') "
        "GROUP BY 1"
    )
    return {row[0]: row[1] for row in rows} == {"pulse rollups": 1, "pulse sweeper": 1}
