from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from pulse.config import Settings
from pulse.sim.broker import MESSAGE_SIZE_LIMIT
from tests.mqtt.broker import MOSQUITTO_MISSING, Mosquitto, mosquitto_binaries
from tests.mqtt.support import Pulse, mqtt_settings, wait_subscribed
from tests.support import free_port, running_server


@pytest.fixture
def mosquitto_binary() -> None:
    """Skips the test where mosquitto is missing (CI installs it, and fails instead)."""
    if mosquitto_binaries() is None:
        if os.environ.get("CI"):
            pytest.fail(MOSQUITTO_MISSING)
        pytest.skip(MOSQUITTO_MISSING)


@pytest.fixture
async def mosquitto(
    mosquitto_binary: None, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Mosquitto]:
    """A Mosquitto of this test's own, started; configured as docs/ingest.md asks, or,
    for a test marked broker_without_size_limit, without its message_size_limit."""
    unlimited = request.node.get_closest_marker("broker_without_size_limit") is not None
    broker = Mosquitto(
        tmp_path / "mosquitto",
        port=free_port(),  # kept across its restarts
        message_size_limit=None if unlimited else MESSAGE_SIZE_LIMIT,
    )
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()


@pytest.fixture
async def pulse(
    settings: Settings, mosquitto: Mosquitto, make_token: Callable[..., str]
) -> AsyncIterator[Pulse]:
    """A Pulse server on this test's database and broker, consuming the device topics."""
    async with (
        running_server(mqtt_settings(settings, mosquitto)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        await wait_subscribed(http)
        admin = {"Authorization": f"Bearer {make_token('t1', ('tenant-admin',))}"}
        yield Pulse(url, http, admin)
