"""`pulse serve` with no DATABASE_URL runs on an embedded PostgreSQL and keeps its data."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pulse.auth.dev_tokens import mint_token
from tests.support import TEST_SECRET, pulse_serve

pytestmark = pytest.mark.timeout(120)


async def test_serve_without_database_url(tmp_path: Path) -> None:
    admin = {
        "Authorization": "Bearer "
        + mint_token(TEST_SECRET, tenant_id="demo", roles=["tenant-admin"])
    }
    async with (
        pulse_serve(data_dir=tmp_path) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
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
    async with (
        pulse_serve(data_dir=tmp_path) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        devices = (await http.get("/api/v1/customer/devices", headers=admin)).json()["devices"]
        assert [d["device_id"] for d in devices] == ["dev-1"]
        r = await http.post(
            "/ingest/v1/tenant/demo/device/dev-1/telemetry",
            json={"metrics": {"temp": 22.0}},
            headers={"X-Provision-Token": device_token},
        )
        assert r.status_code == 201 and r.json() == {"id": 2}
