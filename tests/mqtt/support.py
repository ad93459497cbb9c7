"""Pulse with MQTT, for the MQTT tests: the server, its devices, what it stored."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from pulse.auth.dev_tokens import mint_token
from pulse.config import Settings
from tests.mqtt.broker import Device, Mosquitto
from tests.support import TEST_SECRET, ServeProcess, start_serve
from tests.support import metric as metric  # the MQTT tests take it from here

STATUS = "/api/v1/telemetry/stream/status"
DEVICES = "/api/v1/customer/devices"


@dataclasses.dataclass
class Pulse:
    url: str
    http: httpx.AsyncClient
    admin: dict[str, str]

    async def device(self, device_id: str) -> str:
        """Create a device through the API; its provision token."""
        r = await self.http.post(DEVICES, json={"device_id": device_id}, headers=self.admin)
        assert r.status_code == 201, r.text
        return str(r.json()["provision_token"])


async def mqtt_status(http: httpx.AsyncClient) -> dict[str, Any]:
    return dict((await http.get(STATUS)).json().get("mqtt") or {})


async def wait_subscribed(http: httpx.AsyncClient, *, reconnects: int = 0) -> None:
    """Until the server consumes the device topics and has given the broker its devices
    (on a connection made after ``reconnects`` reconnections)."""

    async def ready() -> bool:
        mqtt = await mqtt_status(http)
        return bool(
            mqtt.get("subscribed") and mqtt.get("synced") and mqtt["reconnects"] >= reconnects
        )

    async with asyncio.timeout(15):
        while not await ready():  # noqa: ASYNC110  another process's state, over HTTP
            await asyncio.sleep(0.02)


def mqtt_settings(settings: Settings, mosquitto: Mosquitto) -> Settings:
    return dataclasses.replace(
        settings, mqtt_url=mosquitto.url, mqtt_client_id=f"pulse-test-{mosquitto.port}"
    )


async def rows(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in await pool.fetch(
            "SELECT device_id, seq, metrics::text AS metrics FROM telemetry ORDER BY id"
        )
    ]


async def until_rows(pool: asyncpg.Pool, count: int, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while await pool.fetchval("SELECT count(*) FROM telemetry") < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


def serve_env(mosquitto: Mosquitto, client_id: str) -> dict[str, str]:
    return {"PULSE_MQTT_URL": mosquitto.url, "PULSE_MQTT_CLIENT_ID": client_id}


async def serving(tmp_path: Path, settings: Settings, env: dict[str, str]) -> ServeProcess:
    """`pulse serve`, ready and consuming the device topics."""
    server = await start_serve(data_dir=tmp_path, database_url=settings.database_url, env=env)
    try:
        await server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            await wait_subscribed(http)
    except BaseException:
        await server.stop()
        raise
    return server


async def new_device(server: ServeProcess, mosquitto: Mosquitto, device_id: str) -> Device:
    token = mint_token(TEST_SECRET, tenant_id="t1", roles=("tenant-admin",))
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        r = await http.post(
            DEVICES, json={"device_id": device_id}, headers={"Authorization": f"Bearer {token}"}
        )
    assert r.status_code == 201, r.text
    return Device(mosquitto, f"t1/{device_id}", r.json()["provision_token"])
