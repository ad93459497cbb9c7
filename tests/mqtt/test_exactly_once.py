"""Exactly once over MQTT: readings stream from a device while the Pulse process is
SIGKILLed and started again, or while the broker restarts; every reading is stored once,
none lost (acknowledged only after commit, a second delivery recognised by its seq)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.mqtt.broker import Device, Mosquitto, closing
from tests.mqtt.support import DEVICES, STATUS, mqtt_settings, mqtt_status, wait_subscribed
from tests.streams.ws_support import WS_PATH, open_ws, recv
from tests.support import ServeProcess, free_port, running_server, start_serve

pytestmark = pytest.mark.timeout(180)

READINGS = 600


async def stored(pool: asyncpg.Pool) -> tuple[int, int]:
    """(rows, distinct seqs) of the device."""
    row = await pool.fetchrow("SELECT count(*) AS n, count(DISTINCT seq) AS d FROM telemetry")
    return int(row["n"]), int(row["d"])


async def stream(device: Device, midway: Callable[[], Awaitable[None]]) -> None:
    """Publish READINGS readings, seq 1..READINGS, a few at a time; ``midway`` once half
    are sent and taken by the broker (while the rest wait to be sent)."""
    sent = []
    for seq in range(1, READINGS + 1):
        body = json.dumps({"metrics": {"n": seq}, "seq": seq}).encode()
        sent.append(device.publish_nowait("pulse/t1/dev-1/telemetry", body))
        if seq % 20 == 0:
            await asyncio.sleep(0.01)  # pace the stream; not a wait for anything
        if seq == READINGS // 2:
            await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, sent)), 30)
            await midway()


async def until_all_stored(pool: asyncpg.Pool, timeout: float = 90) -> None:
    async with asyncio.timeout(timeout):
        while (await stored(pool))[1] < READINGS:  # noqa: ASYNC110  rows have no event
            await asyncio.sleep(0.05)


async def until_stored(pool: asyncpg.Pool, count: int) -> None:
    async with asyncio.timeout(30):
        while (await stored(pool))[0] < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_exactly_once_across_a_pulse_process_killed_mid_stream(
    tmp_path: Path,
    database_url: str,
    mosquitto: Mosquitto,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
) -> None:
    port = free_port()
    env = {
        "PULSE_MQTT_URL": mosquitto.url,
        "PULSE_MQTT_CLIENT_ID": "pulse-killed",
        "PULSE_INGEST_RATE_PER_DEVICE": "100000",
        "PULSE_INGEST_BURST_PER_DEVICE": "100000",
    }

    async def serve() -> ServeProcess:
        process = await start_serve(
            data_dir=tmp_path, database_url=database_url, env=env, port=port
        )
        await process.wait_ready()
        async with httpx.AsyncClient(base_url=process.url, timeout=10) as http:
            await wait_subscribed(http)
        return process

    process = await serve()
    admin = {"Authorization": f"Bearer {make_token('t1', ('tenant-admin',))}"}
    async with httpx.AsyncClient(base_url=process.url, timeout=10) as http:
        r = await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
    device = Device(mosquitto, "t1/dev-1", r.json()["provision_token"])

    async def kill_and_restart() -> None:
        nonlocal process
        await until_stored(pool, READINGS // 3)
        process.kill()
        await process.stop()
        process = await serve()

    try:
        with closing(device):
            await device.connect()
            await stream(device, kill_and_restart)
            await until_all_stored(pool)
    finally:
        await process.stop()
    assert await stored(pool) == (READINGS, READINGS)


async def test_exactly_once_across_a_broker_restart_mid_stream(
    settings: Settings,
    mosquitto: Mosquitto,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
) -> None:
    """The telemetry WebSocket sees every reading once, in order, across the restart."""
    fast = {"ingest_rate_per_device": 100000.0, "ingest_burst_per_device": 100000}
    async with (
        running_server(mqtt_settings(Settings(**{**vars(settings), **fast}), mosquitto)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        await wait_subscribed(http)
        admin = {"Authorization": f"Bearer {make_token('t1', ('tenant-admin',))}"}
        r = await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
        device = Device(mosquitto, "t1/dev-1", r.json()["provision_token"])

        async def restart_broker() -> None:
            """Mid-stream: some readings stored, others queued for Pulse's session (or
            delivered to it and not yet acknowledged), which the broker persists."""
            await until_stored(pool, READINGS // 3)
            before = (await mqtt_status(http))["reconnects"]
            await mosquitto.stop()
            await mosquitto.start()
            # Mosquitto 2.0 does not restore shared subscriptions from its persistence
            # (queued messages it does): what a device publishes before Pulse subscribes
            # again would go nowhere (docs/ingest.md), so the device waits for it here.
            await wait_subscribed(http, reconnects=before + 1)

        seen: list[Any] = []
        async with open_ws(url, WS_PATH, token=make_token("t1")) as ws:
            assert (await recv(ws))["type"] == "connected"
            with closing(device):
                await device.connect()
                await stream(device, restart_broker)
                await until_all_stored(pool)
            while len(seen) < READINGS:
                message = await recv(ws, timeout=30)
                if message["type"] == "telemetry":
                    seen.append(message["data"]["metrics"]["n"])
        status = (await http.get(STATUS)).json()["mqtt"]
    assert await stored(pool) == (READINGS, READINGS)
    assert sorted(seen) == list(range(1, READINGS + 1))
    assert status["reconnects"] >= 1
