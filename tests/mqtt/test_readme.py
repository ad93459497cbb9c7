"""The README's mosquitto_pub line, run as written against a Mosquitto and a Pulse of the
test's own: the reading is stored."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from tests.mqtt.broker import Mosquitto
from tests.mqtt.support import DEVICES, Pulse, rows, until_rows

ROOT = Path(__file__).parent.parent.parent


def readme_command() -> str:
    """The README's shell block that runs mosquitto_pub."""
    blocks = re.findall(r"```sh\n(.*?)```", ROOT.joinpath("README.md").read_text(), re.S)
    return next(block for block in blocks if block.startswith("mosquitto_pub "))


async def test_the_readme_mosquitto_pub_line_stores_a_reading(
    pulse: Pulse, mosquitto: Mosquitto, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    if shutil.which("mosquitto_pub") is None:
        message = "mosquitto_pub is missing: apt-get install mosquitto-clients (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    command = readme_command()
    assert "-p 1883" in command
    command = command.replace("-p 1883", f"-p {mosquitto.port}")
    admin = {"Authorization": f"Bearer {make_token('demo', ('tenant-admin',))}"}
    r = await pulse.http.post(DEVICES, json={"device_id": "dev-0001"}, headers=admin)
    assert r.status_code == 201
    env = {**os.environ, "PULSE_DEVICE_TOKEN": r.json()["provision_token"]}
    shell = await asyncio.create_subprocess_exec("bash", "-c", command, env=env)
    assert await asyncio.wait_for(shell.wait(), 30) == 0
    await until_rows(pool, 1)
    assert await rows(pool) == [{"device_id": "dev-0001", "seq": 1, "metrics": '{"temp": 21.5}'}]
