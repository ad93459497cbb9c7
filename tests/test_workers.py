"""`pulse serve` with PULSE_WORKERS=2: ingest spread over both processes keeps every
tenant's ids exact (each accepted reading one id, no gap, commit order), as a stream
resuming from 0 sees them."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pulse.auth.dev_tokens import mint_token
from pulse.ops.metrics import REFRESH_S
from tests.support import TEST_SECRET, provision_device, pulse_serve, sse_events

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
