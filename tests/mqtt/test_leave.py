"""A Pulse process that stops (SIGTERM) leaves the shared subscription: it settles what
it took and ends its session, so the broker hands what devices publish next to the other
processes instead of keeping a share of it for a client id that may never come back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.mqtt.broker import Device, Mosquitto, closing
from tests.mqtt.support import DEVICES, mqtt_settings, until_rows, wait_subscribed
from tests.support import ServeProcess, running_server, start_serve

pytestmark = pytest.mark.timeout(120)


@asynccontextmanager
async def two_processes(
    tmp_path: Path,
    settings: Settings,
    mosquitto: Mosquitto,
    make_token: Callable[..., str],
) -> AsyncIterator[tuple[ServeProcess, Device]]:
    """A server in this process and one in a subprocess (client id pulse-stopping), both
    consuming; and the device t1/dev-1, connected."""
    fast = {"ingest_rate_per_device": 100000.0, "ingest_burst_per_device": 100000}
    stays = mqtt_settings(Settings(**{**vars(settings), **fast}), mosquitto)
    async with (
        running_server(stays) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        await wait_subscribed(http)
        admin = {"Authorization": f"Bearer {make_token('t1', ('tenant-admin',))}"}
        r = await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
        device = Device(mosquitto, "t1/dev-1", r.json()["provision_token"])
        env = {
            "PULSE_MQTT_URL": mosquitto.url,
            "PULSE_MQTT_CLIENT_ID": "pulse-stopping",
            "PULSE_INGEST_RATE_PER_DEVICE": "100000",
            "PULSE_INGEST_BURST_PER_DEVICE": "100000",
        }
        stopping = await start_serve(data_dir=tmp_path, database_url=settings.database_url, env=env)
        try:
            await stopping.wait_ready()
            async with httpx.AsyncClient(base_url=stopping.url, timeout=10) as other:
                await wait_subscribed(other)
            with closing(device):
                await device.connect()
                yield stopping, device
        finally:
            await stopping.stop()


def reading(seq: int) -> bytes:
    return json.dumps({"metrics": {"n": seq}, "seq": seq}).encode()


async def test_readings_published_after_a_process_stopped_all_reach_the_others(
    tmp_path: Path,
    settings: Settings,
    mosquitto: Mosquitto,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
) -> None:
    """Its session used to stay in the group for 24 hours: the broker kept every other
    reading for it, acknowledged to the device and stored by no one."""
    async with two_processes(tmp_path, settings, mosquitto, make_token) as (stopping, device):
        await stopping.stop()
        for seq in range(1, 21):
            await device.publish("pulse/t1/dev-1/telemetry", reading(seq))
        await until_rows(pool, 20)
    assert b"left the shared subscription" in stopping.stderr


async def test_a_process_stopped_mid_stream_loses_nothing(
    tmp_path: Path,
    settings: Settings,
    mosquitto: Mosquitto,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
) -> None:
    """What the stopping process took it settles before it ends its session (an ended
    session's messages are dropped by the broker, not handed to the others)."""
    count = 400
    async with two_processes(tmp_path, settings, mosquitto, make_token) as (stopping, device):
        sent = []
        for seq in range(1, count + 1):
            sent.append(device.publish_nowait("pulse/t1/dev-1/telemetry", reading(seq)))
            if seq % 20 == 0:
                await asyncio.sleep(0.01)  # pace the stream; not a wait for anything
            if seq == count // 4:
                stopping.proc.terminate()  # SIGTERM, while the device goes on
        await asyncio.wait_for(asyncio.gather(*map(asyncio.wrap_future, sent)), 30)
        await stopping.stop()
        await until_rows(pool, count, timeout=30)
    assert await pool.fetchval("SELECT count(DISTINCT seq) FROM telemetry") == count
