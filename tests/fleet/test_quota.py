"""What one tenant may create: devices and alert rules up to their configured numbers,
held under concurrent creations, another tenant unaffected."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import httpx
import pytest

from pulse.config import Settings
from tests.fleet.conftest import MakeToken, auth
from tests.support import running_server

DEVICES = "/api/v1/customer/devices"
RULES = "/api/v1/customer/alert-rules"


@pytest.fixture
async def http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    limited = dataclasses.replace(settings, max_devices_per_tenant=3, max_rules_per_tenant=2)
    async with running_server(limited) as url, httpx.AsyncClient(base_url=url) as client:
        yield client


async def test_devices_and_rules_stop_at_the_tenant_quota(
    http: httpx.AsyncClient, make_token: MakeToken
) -> None:
    """From the security, fleet and abuse audits: a tenant could create any number of
    rules (every reading is judged against each: 3,000 made its batches 27 times slower
    and kept a database core busy) and of devices (a list read whole)."""
    admin = auth(make_token("t1", roles=("tenant-admin",)))
    # Ten at once against a quota of three: exactly three are made.
    made = await asyncio.gather(
        *(http.post(DEVICES, json={"device_id": f"d{i}"}, headers=admin) for i in range(10))
    )
    assert sorted(r.status_code for r in made) == [201] * 3 + [409] * 7
    refused = next(r for r in made if r.status_code == 409)
    assert refused.json()["error"] == "tenant_quota"
    assert "PULSE_MAX_DEVICES_PER_TENANT" in refused.json()["detail"]
    rule = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 50, "severity": 3}
    made = await asyncio.gather(*(http.post(RULES, json=rule, headers=admin) for _ in range(5)))
    assert sorted(r.status_code for r in made) == [201] * 2 + [409] * 3
    # Another tenant has its own.
    other = auth(make_token("t2", roles=("tenant-admin",)))
    assert (await http.post(DEVICES, json={"device_id": "d0"}, headers=other)).status_code == 201
    assert (await http.post(RULES, json=rule, headers=other)).status_code == 201
    # A place freed is a place to take.
    listed = (await http.get(DEVICES, headers=admin)).json()["devices"]
    device_id = listed[0]["device_id"]
    assert (await http.delete(f"{DEVICES}/{device_id}", headers=admin)).status_code == 204
    assert (await http.post(DEVICES, json={"device_id": "again"}, headers=admin)).status_code == 201


async def test_deleting_a_device_frees_the_places_of_its_rules(
    http: httpx.AsyncClient, make_token: MakeToken
) -> None:
    """A rule for one device goes with it (it used to stay, counted against the quota)."""
    admin = auth(make_token("t1", roles=("tenant-admin",)))
    assert (await http.post(DEVICES, json={"device_id": "dd"}, headers=admin)).status_code == 201
    rule = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 50, "severity": 3}
    for device in ("dd", None):
        made = await http.post(RULES, json={**rule, "device_id": device}, headers=admin)
        assert made.status_code == 201
    assert (await http.post(RULES, json=rule, headers=admin)).status_code == 409
    assert (await http.delete(f"{DEVICES}/dd", headers=admin)).status_code == 204
    assert [r["device_id"] for r in (await http.get(RULES, headers=admin)).json()["rules"]] == [
        None
    ]
    assert (await http.post(RULES, json=rule, headers=admin)).status_code == 201


async def test_at_the_quota_a_duplicate_or_an_unknown_device_is_answered_as_such(
    http: httpx.AsyncClient, make_token: MakeToken
) -> None:
    """A device id the tenant has is device_exists, and a rule for a device it does not
    have unknown_device, as below the quota: not tenant_quota, which said to delete
    something when nothing would be made anyway."""
    admin = auth(make_token("t1", roles=("tenant-admin",)))
    for i in range(3):
        made = await http.post(DEVICES, json={"device_id": f"d{i}"}, headers=admin)
        assert made.status_code == 201
    again = await http.post(DEVICES, json={"device_id": "d0"}, headers=admin)
    assert (again.status_code, again.json()["error"]) == (409, "device_exists")
    beyond = await http.post(DEVICES, json={"device_id": "d3"}, headers=admin)
    assert (beyond.status_code, beyond.json()["error"]) == (409, "tenant_quota")
    assert "has 3 devices" in beyond.json()["detail"]
    rule = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 50, "severity": 3}
    for _ in range(2):
        assert (await http.post(RULES, json=rule, headers=admin)).status_code == 201
    unknown = await http.post(RULES, json={**rule, "device_id": "nope"}, headers=admin)
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_device")
    beyond = await http.post(RULES, json={**rule, "device_id": "d0"}, headers=admin)
    assert (beyond.status_code, beyond.json()["error"]) == (409, "tenant_quota")
    assert "has 2 alert rules" in beyond.json()["detail"]
    listed = (await http.get(DEVICES, headers=admin)).json()["devices"]
    assert [d["device_id"] for d in listed] == ["d0", "d1", "d2"]
    assert len((await http.get(RULES, headers=admin)).json()["rules"]) == 2
