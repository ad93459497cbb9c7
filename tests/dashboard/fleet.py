"""A tenant with a fleet worth looking at: devices with readings, a rule, active alerts."""

from __future__ import annotations

import asyncpg
import httpx

from tests.support import provision_device

HOT_RULE = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 30, "severity": 4}


async def seed_fleet(
    pool: asyncpg.Pool,
    http: httpx.AsyncClient,
    admin_token: str,
    *,
    tenant: str = "t1",
    devices: int = 25,
    hot: int = 5,
) -> list[str]:
    """``devices`` devices, each with a reading, the first ``hot`` of them over the rule's
    threshold: ``hot`` active alerts. Returns the device ids."""
    ids = [f"dev-{n:04d}" for n in range(1, devices + 1)]
    tokens = {device: await provision_device(pool, tenant, device) for device in ids}
    headers = {"Authorization": f"Bearer {admin_token}"}
    r = await http.post("/api/v1/customer/alert-rules", json=HOT_RULE, headers=headers)
    assert r.status_code == 201, r.text
    messages = [
        {
            "tenant_id": tenant,
            "device_id": device,
            "provision_token": tokens[device],
            "metrics": {"temp": 35.0 if n < hot else 21.0 + n / 10, "battery": 80.0},
        }
        for n, device in enumerate(ids)
    ]
    r = await http.post("/ingest/v1/batch", json={"messages": messages})
    assert r.status_code == 200 and r.json()["accepted"] == devices, r.text
    return ids
