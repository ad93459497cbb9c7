"""A Pulse process that stops (SIGTERM) leaves the shared subscription when another stays
in it: it settles what it took and ends its session, so the broker hands what devices
publish next to the other processes instead of keeping a share of it for a client id that
may never come back. The last one keeps its session: what devices publish while no
process runs waits in the broker for it."""

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
from pulse.mqtt.service import MEMBERS_LOCK_KEY
from tests.mqtt.broker import Device, Mosquitto, closing
from tests.mqtt.support import (
    DEVICES,
    mqtt_settings,
    new_device,
    serve_env,
    serving,
    until_rows,
    wait_subscribed,
)
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


async def until_members(pool: asyncpg.Pool, *client_ids: str) -> None:
    """Until each of ``client_ids`` counts in the shared group (migrations/0020)."""
    query = "SELECT count(*) FROM mqtt_members WHERE client_id = ANY($1) AND NOT leaving"
    async with asyncio.timeout(10):
        while await pool.fetchval(query, list(client_ids)) < len(client_ids):  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def publish_while_down(device: Device, count: int) -> None:
    """``count`` readings, each acknowledged Success: the broker has a subscriber to keep
    them for (it answered "No matching subscribers" once the only process had left)."""
    for seq in range(1, count + 1):
        reason = await device.publish("pulse/t1/dev-1/telemetry", reading(seq))
        assert reason.value == 0, str(reason)


async def test_the_only_process_stopped_keeps_its_session_and_loses_nothing(
    tmp_path: Path, settings: Settings, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    """It used to leave the group at SIGTERM with no one left in it: the broker dropped
    every reading published until it was back (the MQTT audit: 10 of 10 lost)."""
    env = serve_env(mosquitto, "pulse-only")
    server = await serving(tmp_path, settings, env)
    try:
        device = await new_device(server, mosquitto, "dev-1")
        await until_members(pool, "pulse-only")
        # A member whose process crashed (its lease expired) does not count as staying.
        crashed = await pool.fetchval(
            """INSERT INTO stream_processes (process_id, description, expires_at)
               VALUES (gen_random_uuid(), 'crashed', now() - interval '1 minute')
               RETURNING process_id"""
        )
        await pool.execute(
            "INSERT INTO mqtt_members (client_id, process_id) VALUES ('pulse-gone', $1)", crashed
        )
    finally:
        await server.stop()
    with closing(device):
        await device.connect()
        await publish_while_down(device, 10)
        again = await serving(tmp_path, settings, env)
        try:
            await until_rows(pool, 10)
        finally:
            await again.stop()
    assert await pool.fetchval("SELECT count(DISTINCT seq) FROM telemetry") == 10
    assert b"session pulse-only kept" in server.stderr
    assert b"left the shared subscription" not in server.stderr


async def test_of_two_processes_stopped_at_once_one_keeps_its_session(
    tmp_path: Path, settings: Settings, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    """A `--workers 2` instance's SIGTERM reaches both: they decide one at a time, so the
    first leaves (the other stays, for all it knows) and the second keeps its session."""
    envs = [serve_env(mosquitto, "pulse-a"), serve_env(mosquitto, "pulse-b")]
    servers = [await serving(tmp_path, settings, envs[0])]
    try:
        servers.append(await serving(tmp_path, settings, envs[1]))
        device = await new_device(servers[0], mosquitto, "dev-1")
        await until_members(pool, "pulse-a", "pulse-b")
        for server in servers:
            server.proc.terminate()
    finally:
        await asyncio.gather(*(server.stop() for server in servers))
    with closing(device):
        await device.connect()
        await publish_while_down(device, 20)
        again = [await serving(tmp_path, settings, env) for env in envs]
        try:
            await until_rows(pool, 20)
        finally:
            await asyncio.gather(*(server.stop() for server in again))
    assert await pool.fetchval("SELECT count(DISTINCT seq) FROM telemetry") == 20
    said = b"".join(server.stderr for server in servers)
    assert said.count(b"left the shared subscription") == 1, said.decode()[-3000:]
    assert said.count(b"kept: what devices publish waits in the broker") == 1, said.decode()[-3000:]


async def test_a_process_that_cannot_ask_the_database_keeps_its_session(
    tmp_path: Path,
    settings: Settings,
    mosquitto: Mosquitto,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
) -> None:
    """The database does not answer in time (here: the members' lock is held elsewhere):
    whether another process stays is unknown, so it stays on the safe side, as after a
    crash, and says why."""
    async with two_processes(tmp_path, settings, mosquitto, make_token) as (stopping, _):
        await until_members(pool, "pulse-stopping")
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MEMBERS_LOCK_KEY)
            await stopping.stop()
    assert b"cannot tell whether another Pulse process stays subscribed" in stopping.stderr
    assert b"session pulse-stopping kept" in stopping.stderr
    assert b"left the shared subscription" not in stopping.stderr
