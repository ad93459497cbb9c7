"""An export asked of a server already streaming as many as it may: the client waits its turn.

The server streams one export per tenant here (``429 export_limit``, Retry-After 5 s).
A large export that its client stops reading holds the slot (its bytes no longer fit
in the sockets' buffers), until that client leaves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import httpx
import orjson
import pytest

from pulse.client import PulseClient
from pulse.client.errors import PulseClientError
from pulse.config import Settings
from tests.history.readings import many_readings
from tests.support import TEST_SECRET, provision_device, running_server

pytestmark = pytest.mark.timeout(90)

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
EXPORT = "/api/v1/customer/devices/d1/telemetry"
# raw: `auto` exports the buckets of a range older than the server's retention, which
# this one is since 8 December 2026, and their few bytes hold no slot.
WINDOW = {"from": "2026-12-01T00:00:00Z", "to": "2026-12-03T00:00:00Z", "bucket": "raw"}
READINGS = 100_000  # x 4 metrics: about 18 MB of CSV
SMALL = {"start": "2026-12-01T10:00:00Z", "end": "2026-12-01T10:00:10Z"}  # ids 1 to 9


@pytest.fixture
async def server(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    await provision_device(pool, "t1", "d1")
    await many_readings(pool, "t1", "d1", READINGS, T0)
    limits = dataclasses.replace(
        settings, max_exports=2, max_exports_per_tenant=1, db_pool_size=4, rollup_interval_s=3600
    )
    async with running_server(limits) as url:
        yield url


async def held_export(url: str, token: str) -> tuple[httpx.AsyncClient, httpx.Response]:
    """An export of the whole window, opened and then not read: it keeps t1's slot."""
    http = httpx.AsyncClient(base_url=url, timeout=20, headers={"Authorization": f"Bearer {token}"})
    request = http.build_request("GET", EXPORT, params=WINDOW, headers={"Accept": "text/csv"})
    response = await http.send(request, stream=True)
    assert response.status_code == 200
    return http, response


async def test_export_waits_for_a_slot_then_streams(
    server: str, make_token: Callable[..., str]
) -> None:
    http, held = await held_export(server, make_token("t1"))
    waits: list[tuple[PulseClientError, float]] = []

    async def export() -> bytes:
        async with PulseClient(server, make_token("t1")) as client:
            chunks = [
                c
                async for c in client.export(
                    "d1",
                    format="ndjson",
                    wait_s=30,
                    on_wait=lambda e, s: waits.append((e, s)),
                    **SMALL,
                )
            ]
        return b"".join(chunks)

    task = asyncio.create_task(export())
    try:
        async with asyncio.timeout(20):
            while not waits:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        refusal, delay_s = waits[0]
        assert (refusal.status, refusal.code, delay_s) == (429, "export_limit", 5.0)
        assert not task.done()
    finally:
        await held.aclose()  # the first client leaves: its slot comes back
        await http.aclose()
    body = await asyncio.wait_for(task, 30)
    assert [orjson.loads(line)["id"] for line in body.splitlines()] == list(range(1, 10))


async def test_export_refused_past_its_wait(server: str, make_token: Callable[..., str]) -> None:
    http, held = await held_export(server, make_token("t1"))
    try:
        async with PulseClient(server, make_token("t1")) as client:
            with pytest.raises(PulseClientError) as refused:
                async for _ in client.export("d1", **SMALL):
                    pass
        assert (refused.value.status, refused.value.code) == (429, "export_limit")
        assert "tenant streams 1 export" in refused.value.detail
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pulse", "export", "--url", server, "--tenant", "t1",
            "--device", "d1", "--from", SMALL["start"], "--to", SMALL["end"], "--wait", "0",
            env={**os.environ, "PULSE_JWT_SECRET": TEST_SECRET},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        await held.aclose()
        await http.aclose()
    assert proc.returncode == 1 and out == b""
    assert err.decode().startswith("pulse export: 429 export_limit: "), err.decode()
