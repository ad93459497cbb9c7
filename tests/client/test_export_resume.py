"""A raw export cut short goes on from where it stopped: the client's bytes, and
``pulse export``'s output, equal the export read whole, every line once.

Readings share milliseconds here (four a millisecond, the later id at the earlier
microsecond), the case where the export's millisecond times alone could not say
where to go on. The first test's server cuts an export after a second
(PULSE_EXPORT_MAX_S); the second's is killed under ``pulse export`` and started again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import httpx
import pytest

from pulse.client import ExportCut, PulseClient
from pulse.config import Settings
from tests.client.exporting import EXPORT, until_cut
from tests.client.restartable import restartable_server
from tests.support import TEST_SECRET, provision_device, running_server

pytestmark = pytest.mark.timeout(120)

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
WINDOW = {"start": "2026-12-01T00:00:00Z", "end": "2026-12-03T00:00:00Z"}
READINGS = 100_000  # x 4 metrics: about 18 MB of CSV


async def readings_sharing_milliseconds(pool: asyncpg.Pool, n: int, start: datetime = T0) -> None:
    """n readings of t1/d1 with four metrics, four a millisecond from ``start``."""
    await provision_device(pool, "t1", "d1")
    await pool.execute(
        """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)
           SELECT 't1', g, 'd1',
                  $1::timestamptz + (g / 4) * interval '1 millisecond'
                                  + (3 - g % 4) * interval '1 microsecond',
                  jsonb_build_object('a', g, 'b', g * 0.5, 'c', g % 2 = 0, 'd', -g)
             FROM generate_series(1, $2) AS g""",
        start,
        n,
    )
    await pool.execute("UPDATE tenants SET last_event_id = $1 WHERE tenant_id = 't1'", n)


async def whole_export(url: str, token: str, format: str) -> bytes:
    accept = {"csv": "text/csv", "ndjson": "application/x-ndjson"}[format]
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        answer = await http.get(
            EXPORT,
            # raw, as the client's: `auto` exports the buckets of a range older than the
            # server's retention, which this one is since 8 December 2026.
            params={"from": WINDOW["start"], "to": WINDOW["end"], "bucket": "raw"},
            headers={"Accept": accept, "Authorization": f"Bearer {token}"},
        )
    assert answer.status_code == 200, answer.text
    return answer.content


@pytest.fixture
async def cutting_server(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    await readings_sharing_milliseconds(pool, READINGS)
    limits = dataclasses.replace(
        settings, max_exports_per_tenant=1, export_max_s=1.0, rollup_interval_s=3600
    )
    async with running_server(limits) as url:
        yield url


@pytest.mark.parametrize("format", ["csv", "ndjson"])
async def test_a_cut_export_goes_on_where_it_stopped(
    cutting_server: str, settings: Settings, make_token: Callable[..., str], format: str
) -> None:
    token = make_token("t1")
    cuts: list[ExportCut] = []
    out = bytearray()
    async with PulseClient(cutting_server, token, backoff_base_s=0.05) as client:
        chunks = aiter(
            client.export(
                "d1", format=format, **WINDOW, resume=5, on_resume=lambda c, _: cuts.append(c)
            )
        )
        out += await anext(chunks)
        await until_cut(cutting_server, token)  # held past PULSE_EXPORT_MAX_S: cut
        async for chunk in chunks:
            out += chunk
    assert cuts, "the export was never cut"
    assert cuts[0].received < len(out)
    async with running_server(settings) as uncut:  # no PULSE_EXPORT_MAX_S to speak of
        whole = await whole_export(uncut, token, format)
    assert len(whole) > 5_000_000
    assert bytes(out) == whole


async def test_pulse_export_goes_on_across_a_killed_server(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    await readings_sharing_milliseconds(pool, READINGS)
    async with restartable_server(database_url, tmp_path) as server:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pulse", "export", "--url", server.url, "--tenant", "t1",
            "--device", "d1", "--from", WINDOW["start"], "--to", WINDOW["end"],
            "--format", "ndjson", "--resume", "10",
            env={**os.environ, "PULSE_JWT_SECRET": TEST_SECRET},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            first = await asyncio.wait_for(proc.stdout.readline(), 30)  # it streams
            # The rest is not read yet: the export waits on a full pipe while its
            # server dies and comes back.
            await server.kill()
            await server.start()
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            out = first + out
        finally:
            if proc.returncode is None:
                proc.kill()
        whole = await whole_export(server.url, make_token("t1"), "ndjson")
    assert proc.returncode == 0, err[-500:]
    assert b"cut after" in err, err[-500:]
    assert out.count(b"\n") == READINGS
    assert out == whole
