"""`pulse serve` with no DATABASE_URL runs on an embedded PostgreSQL and keeps its data."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from pulse.auth.dev_tokens import mint_token
from tests.support import TEST_SECRET

pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def pulse_serve(data_dir: Path) -> AsyncIterator[str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(PULSE_DATA_DIR=str(data_dir), PULSE_JWT_SECRET=TEST_SECRET, PORT=str(port))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pulse",
        "serve",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(600):
                if proc.returncode is not None:
                    raise RuntimeError(f"pulse serve exited with {proc.returncode}")
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("pulse serve did not become ready")
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, stderr.decode()[-2000:]


async def test_serve_without_database_url(tmp_path: Path) -> None:
    admin = {
        "Authorization": "Bearer "
        + mint_token(TEST_SECRET, tenant_id="demo", roles=["tenant-admin"])
    }
    async with pulse_serve(tmp_path) as url, httpx.AsyncClient(base_url=url) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        created = await http.post(
            "/api/v1/customer/devices", json={"device_id": "dev-1"}, headers=admin
        )
        assert created.status_code == 201, created.text
        device_token = created.json()["provision_token"]
        r = await http.post(
            "/ingest/v1/tenant/demo/device/dev-1/telemetry",
            json={"metrics": {"temp": 21.5}},
            headers={"X-Provision-Token": device_token},
        )
        assert r.status_code == 201 and r.json() == {"id": 1}
    assert (tmp_path / "pgdata" / "PG_VERSION").exists()

    # A second start reuses the data folder: the device and its events are still there.
    async with pulse_serve(tmp_path) as url, httpx.AsyncClient(base_url=url) as http:
        devices = (await http.get("/api/v1/customer/devices", headers=admin)).json()["devices"]
        assert [d["device_id"] for d in devices] == ["dev-1"]
        r = await http.post(
            "/ingest/v1/tenant/demo/device/dev-1/telemetry",
            json={"metrics": {"temp": 22.0}},
            headers={"X-Provision-Token": device_token},
        )
        assert r.status_code == 201 and r.json() == {"id": 2}
