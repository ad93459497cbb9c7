"""The Procfile (CONTRACT 8) run as a Heroku-style platform runs it: `release` on a new
database, and again on the next deploy (nothing to do then); `web` with only $PORT,
DATABASE_URL and the secret set, serving on that port."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.support import TEST_SECRET, ServeProcess, free_port

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent


def processes() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, command = line.partition(":")
            entries[name.strip()] = command.strip()
    return entries


def platform_env(database_url: str, **extra: str) -> dict[str, str]:
    """What the platform gives a process: its config vars, and the app's bin on PATH."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DATABASE"))}
    path = f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"
    return base | {"PATH": path, "DATABASE_URL": database_url} | extra


async def test_release_then_web_as_a_platform_runs_them(empty_database: str) -> None:
    entries = processes()
    assert set(entries) == {"release", "web"}
    for deploy in (1, 2):
        release = await asyncio.create_subprocess_exec(
            "bash", "-c", f"exec {entries['release']}", env=platform_env(empty_database),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(release.communicate(), 90)
        assert release.returncode == 0, (deploy, out.decode()[-2000:])
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT to_regclass('telemetry') IS NOT NULL")
    finally:
        await conn.close()

    port = free_port()
    env = platform_env(empty_database, PORT=str(port), PULSE_JWT_SECRET=TEST_SECRET)
    web = await asyncio.create_subprocess_exec(
        "bash", "-c", f"exec {entries['web']}", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    server = ServeProcess(web, f"http://127.0.0.1:{port}")
    try:
        await server.wait_ready()
    finally:
        assert await server.stop() == 0  # SIGTERM, as the platform stops a dyno
