"""The simulator provisions through the device API and sends through real ingest."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import httpx
import pytest

from pulse.sim.simulator import DEFAULT_RULES, Simulator

pytestmark = pytest.mark.timeout(60)


async def test_provision_rules_and_readings(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    admin = make_token(tenant_id="sim", roles=("tenant-admin",))
    simulator = Simulator(server, admin, tenant_id="sim", devices=6, rate=5.0, seed=1)
    try:
        await simulator.provision()
        assert await simulator.ensure_rules() == [r["name"] for r in DEFAULT_RULES]
        assert await simulator.ensure_rules() == [r["name"] for r in DEFAULT_RULES]
        await simulator.run(duration_s=1.2)
    finally:
        await simulator.aclose()

    async with httpx.AsyncClient(
        base_url=server, headers={"Authorization": f"Bearer {admin}"}
    ) as http:
        devices = (await http.get("/api/v1/customer/devices")).json()["devices"]
        rules = (await http.get("/api/v1/customer/alert-rules")).json()["rules"]
    assert [d["device_id"] for d in devices] == [f"dev-{i:04d}" for i in range(1, 7)]
    assert all(d["site_id"] and d["name"] for d in devices)
    assert sorted(r["name"] for r in rules) == sorted(r["name"] for r in DEFAULT_RULES)

    rows = await pool.fetch("SELECT device_id, metrics FROM telemetry WHERE tenant_id = 'sim'")
    assert simulator.sent == len(rows) >= 6 * 4 and simulator.rejected == 0
    assert {row["device_id"] for row in rows} == {d["device_id"] for d in devices}
    assert all(set(row["metrics"]) == {"temp", "humidity", "battery"} for row in rows)


async def test_a_second_run_takes_over_the_existing_devices(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    admin = make_token(tenant_id="sim", roles=("tenant-admin",))
    first = Simulator(server, admin, tenant_id="sim", devices=2, rate=5.0)
    second = Simulator(server, admin, tenant_id="sim", devices=2, rate=5.0)
    try:
        await first.provision()
        await second.provision()  # the devices exist: their tokens are rotated
        await second.run(duration_s=0.5)
        await first.run(duration_s=0.5)  # the old tokens no longer work
    finally:
        await first.aclose()
        await second.aclose()
    assert second.sent > 0 and second.rejected == 0
    assert first.sent == 0 and first.rejected > 0
