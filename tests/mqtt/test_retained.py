"""A retained message is stored once, when it is published: the broker replays it with the
retain flag to every new subscription (a process that joins, one that restarts), and
Pulse refuses those replays. It used to store them (the MQTT audit: one retained reading
became 4 rows; a gone device marked seen again at every restart)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.mqtt.broker import Mosquitto, closing
from tests.mqtt.support import metric, new_device, serve_env, serving, until_rows
from tests.support import until

pytestmark = pytest.mark.timeout(120)

TOPIC = "pulse/t1/dev-1/telemetry"
ERRORS = "pulse/t1/dev-1/errors"


async def settled_one(url: str) -> str:
    """Until the process at ``url`` has settled an MQTT message, whatever its outcome; its
    metrics then."""
    async with httpx.AsyncClient(base_url=url) as http, asyncio.timeout(10):
        while True:
            text = (await http.get("/metrics")).text
            if any(
                line.startswith("pulse_mqtt_messages_total{") and float(line.split()[-1]) > 0
                for line in text.splitlines()
            ):
                return text
            await asyncio.sleep(0.05)


async def test_a_retained_reading_is_stored_once(
    tmp_path: Path, settings: Settings, mosquitto: Mosquitto, pool: asyncpg.Pool
) -> None:
    env = serve_env(mosquitto, "pulse-a")
    first = await serving(tmp_path, settings, env)
    servers = [first]
    try:
        device = await new_device(first, mosquitto, "dev-1")
        with closing(device):
            await device.connect()
            await device.subscribe(ERRORS)

            def notices() -> list[dict[str, object]]:
                return [json.loads(body) for topic, body in device.received if topic == ERRORS]

            # Published while a process is subscribed: delivered live (no retain flag),
            # stored. No seq: a second copy would not even be recognised.
            reason = await device.publish(TOPIC, b'{"metrics": {"r": 1}}', retain=True)
            assert reason.value == 0, str(reason)
            await until_rows(pool, 1)

            # A process that joins gets it replayed: refused, and the device told why.
            joining = await serving(tmp_path, settings, serve_env(mosquitto, "pulse-b"))
            servers.append(joining)
            text = await settled_one(joining.url)
            assert await pool.fetchval("SELECT count(*) FROM telemetry") == 1
            assert metric(text, 'pulse_mqtt_messages_total{outcome="retained"}') == 1
            assert metric(text, 'pulse_ingest_rejected_total{reason="invalid_payload"}') == 1
            await until(lambda: len(notices()) == 1)
            await joining.stop()

            # A process that restarts gets it again: refused again.
            await first.stop()
            again = await serving(tmp_path, settings, env)
            servers.append(again)
            await settled_one(again.url)
            assert await pool.fetchval("SELECT count(*) FROM telemetry") == 1
            await until(lambda: len(notices()) == 2)
    finally:
        for server in servers:
            await server.stop()
    assert {n["error"] for n in notices()} == {"invalid_payload"}
    assert all("Retained messages are not taken" in str(n["detail"]) for n in notices())
