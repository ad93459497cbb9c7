"""The fence around the server libraries' private parts: applied only under the versions
it was written for, and the app still served correctly (the plain ASGI way) otherwise."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from pulse.serving import tuning
from tests.streams.ws_support import V2_PATH, open_ws, raw_ws, read_frame, recv
from tests.support import insert_readings, provision_device, sse_events, start_serve


def test_the_versions_pinned_are_the_versions_written_for() -> None:
    pins = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    for package, version in tuning.WRITTEN_FOR.items():
        assert f'"{package}=={version}"' in pins.lower(), package
    assert tuning.mismatches() == []


def test_a_version_it_was_not_written_for_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tuning.WRITTEN_FOR, "hypercorn", "0.0.1")
    [mismatch] = tuning.mismatches()
    assert mismatch.startswith("hypercorn ") and mismatch.endswith("(written for 0.0.1)")


# `pulse serve` as it would run under a hypercorn the tunings were not written for.
UNKNOWN_VERSION = (
    "from pulse.serving import tuning\n"
    "tuning.WRITTEN_FOR['hypercorn'] = '0.0.1'\n"
    "from pulse.cli import main\n"
    "main(['serve'])\n"
)


async def test_under_other_versions_the_app_is_served_the_plain_way(
    database_url: str, pool: asyncpg.Pool, make_token: Callable[..., str], tmp_path: Path
) -> None:
    server = await start_serve(
        data_dir=tmp_path,
        database_url=database_url,
        script=UNKNOWN_VERSION,
        env={"PULSE_WS_KEEPALIVE_S": "0.3"},
    )
    try:
        await server.wait_ready()
        await provision_device(pool, "t1", "d1")
        token = make_token("t1")
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=10) as http,
            http.stream("GET", f"/api/v1/customer/telemetry/stream/sse?token={token}") as response,
            open_ws(server.url, token=token) as ws,
        ):
            assert response.status_code == 200
            assert (await recv(ws))["type"] == "connected"
            [event_id] = await insert_readings(pool, "t1", [("d1", {"temp": 21.5})])
            message = await recv(ws)
            assert (message["type"], message["id"]) == ("telemetry", event_id)
            async with asyncio.timeout(10):
                async for event in sse_events(response):
                    if event.id == str(event_id):
                        assert event.json()["data"]["metrics"] == {"temp": 21.5}
                        break
        # The v2 keepalive, a ping frame: hypercorn's own pinger, without the tunings.
        async with raw_ws(server.url, V2_PATH, token) as (reader, _), asyncio.timeout(10):
            pings = 0
            while pings < 2:
                pings += (await read_frame(reader))[0] == 0x9
    finally:
        await server.stop()
    log = server.stderr.decode()
    assert log.count("without Pulse's server tunings") == 1, log[-2000:]
    assert "hypercorn 0.18.0 (written for 0.0.1)" in log
