"""One fleet summary for the HTTP route and the v2 WebSocket."""

from __future__ import annotations

import asyncpg
import httpx

from pulse.fleet.summary import fleet_summary
from tests.fleet.conftest import Fleet, MakeToken, auth
from tests.support import seam

SUMMARY = "/api/v1/customer/fleet/summary"


async def shape_fleet(fleet: Fleet) -> None:
    """t1: 2 ONLINE, 1 STALE, 2 OFFLINE, alerts 1 OPEN + 1 ACKNOWLEDGED + 1 CLOSED;
    t2: 1 ONLINE, 1 OPEN alert."""
    for device in ("dev-2", "dev-3", "dev-4", "dev-5"):
        await fleet.device(device)
    await fleet.device("dev-1", tenant_id="t2")
    await fleet.rule("temp", ">", 80)
    await fleet.rule("temp", ">", 80, tenant_id="t2")
    await fleet.send("dev-1", {"temp": 90})
    await fleet.send("dev-2", {"temp": 90})
    await fleet.send("dev-3", {"temp": 90}, {"temp": 1})
    await fleet.send("dev-1", {"temp": 90}, tenant_id="t2")
    await fleet.pool.execute(
        "UPDATE alerts SET status = 'ACKNOWLEDGED' WHERE tenant_id = 't1' AND device_id = 'dev-2'"
    )
    await fleet.pool.execute("UPDATE devices SET status = 'STALE' WHERE device_id = 'dev-3'")


async def test_counts(fleet: Fleet) -> None:
    await shape_fleet(fleet)
    assert await fleet_summary(seam(fleet.pool), "t1") == {
        "ONLINE": 2,
        "STALE": 1,
        "OFFLINE": 2,
        "total": 5,
        "active_alerts": 2,
    }
    assert await fleet_summary(seam(fleet.pool), None) == {
        "ONLINE": 3,
        "STALE": 1,
        "OFFLINE": 2,
        "total": 6,
        "active_alerts": 3,
    }
    empty = {"ONLINE": 0, "STALE": 0, "OFFLINE": 0, "total": 0, "active_alerts": 0}
    assert await fleet_summary(seam(fleet.pool), "nobody") == empty


async def test_the_route_serves_the_same_numbers(
    http: httpx.AsyncClient, fleet: Fleet, make_token: MakeToken
) -> None:
    await shape_fleet(fleet)
    pool: asyncpg.Pool = fleet.pool
    customer = auth(make_token("t1", roles=("customer",)))
    operator = auth(make_token(None, roles=("operator",)))

    response = await http.get(SUMMARY, headers=customer)
    assert response.status_code == 200
    assert response.json() == await fleet_summary(seam(pool), "t1")
    assert (await http.get(SUMMARY + "?tenant_id=t2", headers=customer)).status_code == 403
    assert (await http.get(SUMMARY)).status_code == 401
    assert (await http.get(SUMMARY, headers=operator)).json() == await fleet_summary(
        seam(pool), None
    )
    assert (await http.get(SUMMARY + "?tenant_id=t2", headers=operator)).json() == (
        await fleet_summary(seam(pool), "t2")
    )
    # A tenant given twice is refused, whichever comes first (the review of 7 December:
    # an empty one first answered for every tenant).
    for twice in ("?tenant_id=&tenant_id=t2", "?tenant_id=t2&tenant_id="):
        response = await http.get(SUMMARY + twice, headers=operator)
        assert response.status_code == 400, twice
        assert response.json()["error"] == "invalid_tenant_id"
