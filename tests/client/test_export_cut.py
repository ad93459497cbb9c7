"""An export the server cuts short (PULSE_EXPORT_MAX_S) says so, in the client and in
``pulse export``: what was written is never mistaken for the whole.

The server cuts an export after a second here. Its client stops reading after the first
chunk (a large export's bytes then no longer fit in the sockets' buffers) until the
server has cut it, which shows as the tenant's export slot coming free.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import pytest

from pulse.client import ExportCut, PulseClient
from pulse.config import Settings
from tests.client.exporting import until_cut
from tests.history.readings import many_readings
from tests.support import TEST_SECRET, provision_device, running_server

pytestmark = pytest.mark.timeout(90)

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
WINDOW = {"start": "2026-12-01T00:00:00Z", "end": "2026-12-03T00:00:00Z"}
READINGS = 100_000  # x 4 metrics: about 18 MB of CSV


@pytest.fixture
async def server(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    await provision_device(pool, "t1", "d1")
    await many_readings(pool, "t1", "d1", READINGS, T0)
    limits = dataclasses.replace(
        settings, max_exports_per_tenant=1, export_max_s=1.0, rollup_interval_s=3600
    )
    async with running_server(limits) as url:
        yield url


async def test_the_client_raises_when_an_export_is_cut(
    server: str, make_token: Callable[..., str]
) -> None:
    token = make_token("t1")
    received = 0
    async with PulseClient(server, token) as client:
        chunks = aiter(client.export("d1", format="csv", **WINDOW))
        received += len(await anext(chunks))
        await until_cut(server, token)
        with pytest.raises(ExportCut) as cut:
            async for chunk in chunks:
                received += len(chunk)
    assert cut.value.code == "export_cut"
    assert f"after {cut.value.received:,} bytes" in str(cut.value)
    assert 0 < cut.value.received == received < 18_000_000
    assert "PULSE_EXPORT_MAX_S" in cut.value.detail


async def test_pulse_export_exits_with_the_reason_when_cut(
    server: str, make_token: Callable[..., str]
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pulse", "export", "--url", server, "--tenant", "t1",
        "--device", "d1", "--from", WINDOW["start"], "--to", WINDOW["end"], "--resume", "0",
        env={**os.environ, "PULSE_JWT_SECRET": TEST_SECRET},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    header = b"id,time,metric,value\r\n"
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readexactly(len(header)), 30)  # it streams
        # The rest of its output is not read yet: it stops at a full pipe, and is cut.
        await until_cut(server, make_token("t1"))
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        out = first + out
    finally:
        if proc.returncode is None:
            proc.kill()
    assert proc.returncode == 1, (len(out), err[-300:])
    assert out.startswith(header)
    message = err.decode()
    assert message.startswith("pulse export: 200 export_cut: "), message
    assert f"after {len(out):,} bytes" in message
    assert "Traceback" not in message
