"""PulseClient's history calls and `pulse export` against a real server."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import pytest

from pulse.client import PulseClient
from pulse.client.errors import PulseClientError
from pulse.config import Settings
from tests.history.readings import readings_at
from tests.support import TEST_SECRET, provision_device, running_server

pytestmark = pytest.mark.timeout(60)

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
S = timedelta(seconds=1)


@pytest.fixture
async def server(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    await provision_device(pool, "t1", "d1")
    await provision_device(pool, "t1", "d2")
    await readings_at(
        pool,
        "t1",
        [("d1", T0 + i * 30 * S, {"temp": float(i), "hum": 50.0}) for i in range(40)]
        + [("d2", T0, {"temp": 3.0})],
    )
    async with running_server(settings) as url:
        yield url


async def test_history_buckets_readings_and_fleet(
    server: str, make_token: Callable[..., str]
) -> None:
    end = T0 + timedelta(minutes=20)
    async with PulseClient(server, make_token("t1")) as client:
        history = await client.history(
            "d1", metrics=["temp"], start=T0, end=end, bucket="5m", aggregates=["max", "count"]
        )
        assert history.bucket == "5m" and history.last_event_id == 41
        assert [(b.t, b.max, b.count, b.avg) for b in history.series["temp"]] == [
            (T0 + timedelta(minutes=5 * k), 10.0 * k + 9, 10, None) for k in range(4)
        ]
        readings = [r async for r in client.iter_readings("d1", start=T0, end=end, page_size=7)]
        assert [r.id for r in readings] == list(range(1, 41))
        assert readings[3].time == T0 + 90 * S and readings[3].metrics == {"temp": 3.0, "hum": 50.0}
        fleet = await client.fleet_history("temp", start=T0, end=end, bucket="1h")
        assert {d: [b.count for b in s] for d, s in fleet.series.items()} == {"d1": [40], "d2": [1]}
        with pytest.raises(PulseClientError) as failure:
            await client.history("ghost", start=T0, end=end)
        assert failure.value.code == "unknown_device"


async def test_iter_readings_without_start_keeps_its_first_window(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """Without start, the server's default window (the hour before its now) moves on
    between pages: a page after the first still gets every reading after its cursor,
    those that left the default window meanwhile too."""
    await provision_device(pool, "t1", "d3")
    edge = datetime.now(UTC) - timedelta(hours=1)
    # The first inside the default window for 8 s (the first page must come before it
    # leaves, on a busy machine too); the next two leave it within 9 s.
    times = [edge + 8 * S, edge + 8.5 * S, edge + 9 * S, edge + 60 * S]
    ids = await readings_at(pool, "t1", [("d3", t, {"n": float(n)}) for n, t in enumerate(times)])
    got = []
    async with PulseClient(server, make_token("t1")) as client:
        async for reading in client.iter_readings("d3", page_size=1):
            got.append(reading.id)
            if len(got) == 1:
                await default_window_starts_at(client, "d3", ids[3])
    assert got == ids


async def default_window_starts_at(client: PulseClient, device_id: str, first_id: int) -> None:
    """Wait until the server's default window (no from) starts at the reading ``first_id``."""
    url = f"/api/v1/customer/devices/{device_id}/telemetry"
    headers = {"Authorization": f"Bearer {await client.credentials.current()}"}
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        page = await client.http.get(url, params={"bucket": "raw", "limit": "1"}, headers=headers)
        if [r["id"] for r in page.json()["readings"]] == [first_id]:
            return
        assert asyncio.get_running_loop().time() < deadline, page.json()
        await asyncio.sleep(0.1)


async def test_export_streams_bytes(server: str, make_token: Callable[..., str]) -> None:
    async with PulseClient(server, make_token("t1")) as client:
        chunks = [
            c
            async for c in client.export(
                "d1", format="csv", metrics=["temp"], start=T0, end=T0 + timedelta(hours=1)
            )
        ]
    rows = list(csv.reader(io.StringIO(b"".join(chunks).decode())))
    assert rows[0] == ["id", "time", "metric", "value"]
    assert [r[3] for r in rows[1:]] == [f"{float(i)}" for i in range(40)]


async def test_pulse_export_writes_ndjson(server: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pulse",
        "export",
        "--url",
        server,
        "--tenant",
        "t1",
        "--device",
        "d1",
        "--from",
        "2026-12-01T10:00:00Z",
        "--to",
        "2026-12-01T10:10:00Z",
        "--format",
        "ndjson",
        env={**os.environ, "PULSE_JWT_SECRET": TEST_SECRET},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    lines = [orjson.loads(line) for line in out.splitlines()]
    assert [line["id"] for line in lines] == list(range(1, 21))
    assert lines[0] == {"id": 1, "time": "2026-12-01T10:00:00.000Z",
                        "metrics": {"hum": 50.0, "temp": 0.0}}  # fmt: skip


async def test_pulse_export_reports_an_unknown_device(server: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pulse", "export", "--url", server, "--tenant", "t1",
        "--device", "ghost",
        env={**os.environ, "PULSE_JWT_SECRET": TEST_SECRET},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and out == b""
    assert "unknown_device" in err.decode()
