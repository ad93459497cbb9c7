"""`pulse demo` with Mosquitto installed: a broker of its own, every fifth device publishing
over MQTT, and a mosquitto_pub command that works as printed; again after a restart."""

from __future__ import annotations

import asyncio
import io
import re
import shlex
import shutil
import subprocess

import asyncpg
import pytest

from pulse.config import Settings
from pulse.sim.demo import run_demo
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)


async def run_until_ready(settings: Settings, port: int) -> tuple[asyncio.Task[None], str]:
    out = io.StringIO()
    stop = asyncio.Event()
    demo = asyncio.create_task(
        run_demo(settings, port=port, devices=10, rate=5, out=out, stop=stop)
    )
    demo.stop = stop  # type: ignore[attr-defined]
    async with asyncio.timeout(60):
        while "Press Ctrl-C" not in out.getvalue():
            if demo.done():
                demo.result()
            await asyncio.sleep(0.05)
    return demo, out.getvalue()


async def mqtt_rows(pool: asyncpg.Pool, device_id: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM telemetry WHERE device_id = $1 AND seq IS NOT NULL", device_id
        )
    )


async def test_the_demo_sends_every_fifth_device_over_its_own_broker(
    settings: Settings, mosquitto_binary: None, pool: asyncpg.Pool
) -> None:
    port = free_port()
    for run in ("first", "restarted"):
        demo, text = await run_until_ready(settings, port)
        try:
            assert "2 of the devices publish over MQTT" in text, text
            before = await mqtt_rows(pool, "dev-0005")
            async with asyncio.timeout(30):
                while await mqtt_rows(pool, "dev-0005") <= before:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert await mqtt_rows(pool, "dev-0001") == 0, run  # over HTTP: no seq
            if shutil.which("mosquitto_pub") is None:
                continue
            printed = re.search(r"  (mosquitto_pub .*?\}'\n)", text, re.S)
            assert printed, text
            command = shlex.split(printed[1].replace("\\\n", " "))
            result = await asyncio.to_thread(subprocess.run, command, capture_output=True)
            assert result.returncode == 0, result
            async with asyncio.timeout(10):
                while not await pool.fetchval(  # noqa: ASYNC110
                    "SELECT count(*) FROM telemetry WHERE metrics = '{\"temp\": 21.5}'"
                ):
                    await asyncio.sleep(0.05)
        finally:
            demo.stop.set()  # type: ignore[attr-defined]
            await asyncio.wait_for(demo, 30)
