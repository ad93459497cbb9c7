"""`pulse serve` with PULSE_WORKERS=2: ingest spread over both processes keeps every
tenant's ids exact (each accepted reading one id, no gap, commit order), as a stream
resuming from 0 sees them."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import signal
import tempfile
import time
from collections.abc import Collection
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pulse.auth.dev_tokens import mint_token
from pulse.ops.metrics import REFRESH_S
from tests.support import (
    TEST_SECRET,
    ServeProcess,
    provision_device,
    pulse_serve,
    sse_events,
    start_serve,
)
from tests.uploads import slow_upload
from tests.web.db_proxy import database_proxy

pytestmark = pytest.mark.timeout(180)

CLIENTS, REQUESTS, BATCH = 8, 16, 10


async def scrape(url: str) -> dict[str, float]:
    """/metrics on a new connection (so either worker may answer): every sample by
    name and labels, and each metric's samples summed by name alone."""
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=fresh) as http:
        text = (await http.get("/metrics")).text
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
            if labels:
                found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def worker_pids(pid: int) -> set[int]:
    """The children (workers) of the server process ``pid``."""
    return set(map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split()))


RUNNING = b"hypercorn.error: Running on"


async def both_serving(server: ServeProcess) -> set[int]:
    """Until each worker serves, not only the one /readyz reached; their pids."""
    workers = worker_pids(server.proc.pid)
    for pid in workers:
        await until_said(server, f"[{pid}] ".encode() + RUNNING)
    return workers


async def until_said(server: ServeProcess, text: bytes, besides: Collection[int] = ()) -> None:
    """Until the server's stderr (kept in ``server.stderr``) has a line with ``text``
    said by a process other than ``besides``."""
    deadline = time.monotonic() + 60
    while not any(
        text in line and not any(f"[{pid}]".encode() in line for pid in besides)
        for line in server.stderr.splitlines()
    ):
        assert server.proc.returncode is None, server.stderr.decode()[-2000:]
        assert time.monotonic() < deadline, server.stderr.decode()[-2000:]
        assert server.proc.stderr is not None
        with contextlib.suppress(TimeoutError):
            server.stderr += await asyncio.wait_for(server.proc.stderr.read(4096), 0.5)


async def test_ingest_over_two_workers_keeps_ids_exact(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    tokens = {f"dev-{n}": await provision_device(pool, "t1", f"dev-{n}") for n in range(CLIENTS)}
    async with pulse_serve(
        data_dir=tmp_path,
        database_url=database_url,
        env={"PULSE_WORKERS": "2", "PULSE_ACCESS_LOG": "1"},
        stdout=-1,
    ) as server:
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2
        # Both serving before the load: the server answers once one does, and on a busy
        # machine the other, still starting, took none of the 128 connections.
        assert server.proc.stderr is not None
        async with asyncio.timeout(60):
            while not all(
                f"[{pid}] hypercorn.error: Running on".encode() in server.stderr for pid in workers
            ):
                server.stderr += await server.proc.stderr.readline()
        accepted: list[int] = []

        async def device(device_id: str) -> None:
            # A connection per request, so the kernel spreads them over both workers.
            fresh = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=server.url, limits=fresh) as http:
                for n in range(REQUESTS):
                    if n % 2:
                        r = await http.post(
                            f"/ingest/v1/tenant/t1/device/{device_id}/telemetry",
                            headers={"X-Provision-Token": tokens[device_id]},
                            json={"metrics": {"n": n}},
                        )
                        assert r.status_code == 201, r.text
                        accepted.append(r.json()["id"])
                    else:
                        messages = [
                            {
                                "tenant_id": "t1",
                                "device_id": device_id,
                                "provision_token": tokens[device_id],
                                "metrics": {"n": n, "k": k},
                            }
                            for k in range(BATCH)
                        ]
                        r = await http.post("/ingest/v1/batch", json={"messages": messages})
                        assert r.status_code == 200, r.text
                        accepted.extend(res["id"] for res in r.json()["results"])

        await asyncio.gather(*(device(d) for d in tokens))
        total = CLIENTS * (REQUESTS // 2 * 1 + (REQUESTS - REQUESTS // 2) * BATCH)
        assert sorted(accepted) == list(range(1, total + 1)), "one id each, no gap"

        # A stream from the start sees exactly those ids, in order.
        seen: list[int] = []
        token = mint_token(TEST_SECRET, tenant_id="t1", roles=["customer"])
        headers = {"Authorization": "Bearer " + token}
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=30) as http,
            http.stream(
                "GET",
                "/api/v1/customer/telemetry/stream/sse",
                params={"last_event_id": "0"},
                headers=headers,
            ) as response,
        ):
            async for event in sse_events(response):
                if event.event is None:
                    seen.append(json.loads(event.data)["id"])
                    if len(seen) == total:
                        break
        assert seen == list(range(1, total + 1))

        # Whichever worker a scrape reaches, it answers for the instance: every row
        # committed, and (once the other worker's sampled gauges are refreshed, within
        # REFRESH_S) the one open stream, on one of the two.
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=30) as http,
            http.stream("GET", "/api/v1/customer/telemetry/stream/sse", headers=headers) as held,
        ):
            assert held.status_code == 200
            chunks = held.aiter_bytes()  # kept: collected, it would close the stream
            await anext(chunks)  # admitted: "retry:" is out
            deadline = time.monotonic() + 10 * REFRESH_S
            in_a_row = 0
            while in_a_row < 8:
                scraped = await scrape(server.url)
                assert scraped["pulse_ingest_rows_total"] == total, scraped
                streams = scraped.get('pulse_stream_connections{kind="sse"}')
                in_a_row = in_a_row + 1 if streams == 1 else 0
                assert in_a_row or time.monotonic() < deadline, scraped
                if not in_a_row:
                    await asyncio.sleep(0.1)
    # Both workers took some of it (or the test would not test two): each names itself
    # in the lines it writes to the one stderr they share.
    lines = server.stderr.decode().splitlines()
    for pid in workers:
        answered = [line for line in lines if f"[{pid}] hypercorn.access:" in line]
        assert any("/ingest/v1/" in line for line in answered), (pid, lines[-20:])


async def test_a_worker_that_dies_is_replaced_and_its_gauges_go_with_it(
    database_url: str, tmp_path: Path
) -> None:
    """From the cluster audit: a SIGKILLed worker stayed a zombie, nothing said so, the
    instance served on at half its workers, its /metrics kept the dead worker's gauges
    (a second relay), and the supervisor then exited 0."""
    async with pulse_serve(
        data_dir=tmp_path, database_url=database_url, env={"PULSE_WORKERS": "2"}, stdout=-1
    ) as server:
        before = worker_pids(server.proc.pid)
        dead = max(before)  # the second: the old supervisor waited on the first only
        pattern = f"{tempfile.gettempdir()}/pulse-metrics-*/gauge_livesum_{dead}.db"
        deadline = time.monotonic() + 30
        while not (gauges := glob.glob(pattern)):  # made once the worker has started
            assert time.monotonic() < deadline, "the worker's live gauges never appeared"
            await asyncio.sleep(0.1)
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(now := worker_pids(server.proc.pid) - {dead}) < 2:
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.1)
        assert not any(map(os.path.exists, gauges))
        await server.wait_ready()
    said = server.stderr.decode()
    assert f"worker 0 (pid {dead}) exited" in said or f"(pid {dead}) exited" in said, said[-2000:]
    assert server.proc.returncode == 0


async def test_a_replacement_that_cannot_reach_the_database_is_tried_again_while_others_serve(
    database_url: str, tmp_path: Path
) -> None:
    """From the operations audit (MEDIUM): during a database outage a worker died, its
    replacement could not reach the database and exited 1 at once, and the supervisor
    took that for an instance that cannot start ("worker 1 exited with status 1 as it
    started; stopping"): it stopped the healthy worker too, and exited 1. Now the
    replacement is started again with a backoff, the other worker serving meanwhile,
    until the database is back."""
    async with (
        database_proxy(database_url) as proxy,
        pulse_serve(
            data_dir=tmp_path, database_url=proxy.dsn, env={"PULSE_WORKERS": "2"}, stdout=-1
        ) as server,
    ):
        before = await both_serving(server)
        proxy.cut()
        os.kill(max(before), signal.SIGKILL)
        # Two failed starts in a row: the second said with a longer wait.
        await until_said(server, b"(2 in a row); starting it again in 2 s")
        # The worker that was serving still is: it answers, and for the outage.
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).status_code == 503
        proxy.mend()
        # A replacement serves (one started before the mend may still fail first).
        await until_said(server, RUNNING, besides=before)
    assert b"as it started; stopping" not in server.stderr, server.stderr.decode()[-2000:]
    assert server.proc.returncode == 0


async def test_workers_stop_when_their_supervisor_is_killed(
    database_url: str, tmp_path: Path
) -> None:
    """From the cluster audit: with the supervisor SIGKILLed, its workers served on
    (their parent now init), holding the port against the next start."""
    server = await start_serve(
        data_dir=tmp_path, database_url=database_url, env={"PULSE_WORKERS": "2"}
    )
    try:
        # As soon as they are spawned, still starting: a worker that read its parent
        # with getppid() then took init for it, and never stopped.
        deadline = time.monotonic() + 30
        while len(workers := worker_pids(server.proc.pid)) < 2:
            assert time.monotonic() < deadline, workers
            await asyncio.sleep(0.02)
        server.proc.kill()
        server.killed = True
        deadline = time.monotonic() + 30
        while alive := [p for p in workers if _running(p)]:
            assert time.monotonic() < deadline, alive
            await asyncio.sleep(0.1)
    finally:
        await server.stop()


def _running(pid: int) -> bool:
    """Not a zombie (a worker that exited but was not reaped yet counts as gone)."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


async def test_sigterm_closes_the_shared_socket_at_once_and_in_flight_requests_finish(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """From the operations audit (MEDIUM): with two workers, the supervisor kept its copy
    of the listening socket until the last worker had exited, so for the whole graceful
    timeout the kernel went on accepting connections no process would read, then reset
    them (13 and 33 ingest requests per restart under load), where one process refuses
    them at once. Now the socket stops listening as the workers start their shutdown:
    a new connection is refused while a request in flight (a body still arriving) is
    still answered 201."""
    token = await provision_device(pool, "t1", "d1")
    # A timeout far beyond the test's deadlines: the socket must close without waiting for it.
    env = {"PULSE_WORKERS": "2", "PULSE_SHUTDOWN_TIMEOUT_S": "30"}
    async with pulse_serve(data_dir=tmp_path, database_url=database_url, env=env) as server:
        await both_serving(server)  # one still starting would hold the socket as it starts
        port = int(server.url.rsplit(":", 1)[1])
        upload = await slow_upload(server.url, "t1", "d1", token)
        started = time.monotonic()
        server.proc.terminate()
        refused_after = None
        failed: list[str] = []  # neither taken nor refused: said if the test fails
        while refused_after is None:
            assert time.monotonic() - started < 5, f"new connections still accepted: {failed}"
            try:
                # Bounded: a connection the kernel could not queue waits for its retry.
                opening = asyncio.open_connection("127.0.0.1", port)
                _, writer = await asyncio.wait_for(opening, 1)
            except ConnectionRefusedError:
                refused_after = time.monotonic() - started
            except OSError as exc:  # TimeoutError among them
                failed.append(repr(exc))
            else:
                writer.close()  # taken by a worker not yet stopping, or queued: again
                await asyncio.sleep(0.01)
        try:
            status, body = await asyncio.wait_for(upload.finish(), 10)
        except TimeoutError:
            raise AssertionError("the request in flight was not answered") from None
        assert status == 201, body
        await server.stop()
    assert await pool.fetchval("SELECT count(*) FROM telemetry") == 1
    assert refused_after < 5
