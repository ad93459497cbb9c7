from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.mqtt.broker import MOSQUITTO_MISSING, Mosquitto, mosquitto_binaries


@pytest.fixture
def mosquitto_binary() -> None:
    """Skips the test where mosquitto is missing (CI installs it, and fails instead)."""
    if mosquitto_binaries() is None:
        if os.environ.get("CI"):
            pytest.fail(MOSQUITTO_MISSING)
        pytest.skip(MOSQUITTO_MISSING)


@pytest.fixture
async def mosquitto(mosquitto_binary: None, tmp_path: Path) -> AsyncIterator[Mosquitto]:
    """A Mosquitto of this test's own, started."""
    broker = Mosquitto(tmp_path / "mosquitto")
    await broker.start()
    try:
        yield broker
    finally:
        await broker.stop()
