"""The alert lifecycle API, and the alert lists the v2 WebSocket shares."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.fleet.alerts import AlertClosed, active_alerts, next_status
from tests.fleet.conftest import Fleet, MakeToken, Notifications, auth, kinds
from tests.support import seam

ALERTS = "/api/v1/customer/alerts"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ALERT_KEYS = {
    "alert_id",
    "device_id",
    "alert_type",
    "severity",
    "status",
    "summary",
    "details",
    "created_at",
    "updated_at",
}


async def raise_alert(
    pool: asyncpg.Pool, tenant_id: str = "t1", device_id: str = "dev-1", rule_id: int = 1
) -> int:
    """An OPEN THRESHOLD alert, straight into the table (rules have their own tests)."""
    await pool.execute(
        "INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant_id
    )
    alert_id = await pool.fetchval(
        """INSERT INTO alerts (tenant_id, device_id, alert_type, rule_id, severity, summary,
                               details)
           VALUES ($1, $2, 'THRESHOLD', $3, 2, 'hot', '{"metric": "temp"}')
           RETURNING alert_id""",
        tenant_id,
        device_id,
        rule_id,
    )
    return int(alert_id)


@pytest.fixture
def admin(make_token: MakeToken) -> dict[str, str]:
    return auth(make_token("t1", roles=("tenant-admin",), subject="ada"))


@pytest.fixture
def customer(make_token: MakeToken) -> dict[str, str]:
    return auth(make_token("t1", roles=("customer",)))


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "detail"}
    return str(body["error"])


async def test_next_status() -> None:
    assert next_status("OPEN", "acknowledge") == "ACKNOWLEDGED"
    assert next_status("ACKNOWLEDGED", "acknowledge") == "ACKNOWLEDGED"
    for status in ("OPEN", "ACKNOWLEDGED", "CLOSED"):
        assert next_status(status, "close") == "CLOSED"
    with pytest.raises(AlertClosed):
        next_status("CLOSED", "acknowledge")


async def test_lifecycle(
    http: httpx.AsyncClient,
    pool: asyncpg.Pool,
    admin: dict[str, str],
    notifications: Notifications,
) -> None:
    alert_id = await raise_alert(pool)
    assert kinds(await notifications.since_last()) == [("alerts", "t1"), ("alerts", "*")]
    [listed] = (await http.get(ALERTS, headers=admin)).json()["alerts"]
    assert set(listed) == ALERT_KEYS
    assert listed["status"] == "OPEN"
    assert ISO_Z.match(listed["created_at"]) and ISO_Z.match(listed["updated_at"])
    assert listed["details"]["metric"] == "temp"
    assert listed["details"]["trigger_count"] == 1
    assert listed["details"]["acknowledged_by"] is None

    acked = await http.post(f"{ALERTS}/{alert_id}/acknowledge", headers=admin)
    assert acked.status_code == 200
    alert = acked.json()
    assert set(alert) == ALERT_KEYS
    assert alert["status"] == "ACKNOWLEDGED"
    assert alert["details"]["acknowledged_by"] == "ada"
    assert ISO_Z.match(alert["details"]["acknowledged_at"])
    assert alert["updated_at"] >= listed["updated_at"]
    assert kinds(await notifications.since_last()) == [("alerts", "t1"), ("alerts", "*")]

    # Again: nothing changes, nobody is told.
    again = await http.post(f"{ALERTS}/{alert_id}/acknowledge", headers=admin)
    assert again.status_code == 200
    assert again.json() == alert
    assert kinds(await notifications.since_last()) == []

    closed = await http.post(f"{ALERTS}/{alert_id}/close", headers=admin)
    assert closed.status_code == 200
    details = closed.json()["details"]
    assert closed.json()["status"] == "CLOSED"
    assert (details["closed_by"], details["closed_reason"]) == ("ada", "manual")
    assert details["acknowledged_by"] == "ada"
    assert kinds(await notifications.since_last()) == [("alerts", "t1"), ("alerts", "*")]

    late = await http.post(f"{ALERTS}/{alert_id}/acknowledge", headers=admin)
    assert late.status_code == 409
    assert error_of(late) == "alert_closed"
    assert (await http.post(f"{ALERTS}/{alert_id}/close", headers=admin)).json() == closed.json()
    assert kinds(await notifications.since_last()) == []


async def test_an_open_alert_can_be_closed_directly(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    alert_id = await raise_alert(pool)
    closed = await http.post(f"{ALERTS}/{alert_id}/close", headers=admin)
    assert closed.json()["status"] == "CLOSED"
    assert closed.json()["details"]["acknowledged_by"] is None


async def test_status_filter(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    opened, acked, closed = [await raise_alert(pool, rule_id=i) for i in (1, 2, 3)]
    await http.post(f"{ALERTS}/{acked}/acknowledge", headers=admin)
    await http.post(f"{ALERTS}/{closed}/close", headers=admin)

    async def ids(query: str) -> list[int]:
        response = await http.get(ALERTS + query, headers=admin)
        assert response.status_code == 200
        return [a["alert_id"] for a in response.json()["alerts"]]

    assert await ids("") == [closed, acked, opened]
    assert await ids("?status=active") == [acked, opened]
    assert await ids("?status=OPEN") == [opened]
    assert await ids("?status=ACKNOWLEDGED") == [acked]
    assert await ids("?status=CLOSED") == [closed]
    for bad in ("?status=open", "?status=x", "?limit=0", "?limit=501", "?limit=x", "?cursor=-1"):
        response = await http.get(ALERTS + bad, headers=admin)
        assert response.status_code == 400, bad
        assert error_of(response) == "invalid_parameter"


async def test_pagination(
    http: httpx.AsyncClient, pool: asyncpg.Pool, customer: dict[str, str]
) -> None:
    made = [await raise_alert(pool, rule_id=i) for i in range(7)]
    pages: list[list[int]] = []
    cursor: str | None = None
    while True:
        query = "?limit=3" + (f"&cursor={cursor}" if cursor else "")
        body: dict[str, Any] = (await http.get(ALERTS + query, headers=customer)).json()
        pages.append([a["alert_id"] for a in body["alerts"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
        if len(pages) == 1:
            # An alert raised meanwhile does not shift the pages after it.
            await raise_alert(pool, rule_id=99)
    newest_first = made[::-1]
    assert pages == [newest_first[:3], newest_first[3:6], newest_first[6:]]
    # A page that ends exactly at the last alert says so.
    body = (await http.get(ALERTS + "?limit=8", headers=customer)).json()
    assert len(body["alerts"]) == 8 and body["next_cursor"] is None


async def test_tenant_isolation(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    mine = await raise_alert(pool)
    theirs = await raise_alert(pool, tenant_id="t2")
    assert [a["alert_id"] for a in (await http.get(ALERTS, headers=admin)).json()["alerts"]] == [
        mine
    ]
    for alert_id in (str(theirs), "123456", "abc", "99999999999999999999"):
        for action in ("acknowledge", "close"):
            response = await http.post(f"{ALERTS}/{alert_id}/{action}", headers=admin)
            assert response.status_code == 404
            assert error_of(response) == "unknown_alert"
    assert await pool.fetchval("SELECT status FROM alerts WHERE alert_id = $1", theirs) == "OPEN"


async def test_roles(
    http: httpx.AsyncClient,
    pool: asyncpg.Pool,
    customer: dict[str, str],
    make_token: MakeToken,
) -> None:
    alert_id = await raise_alert(pool)
    operator = auth(make_token(None, roles=("operator",)))
    operator_admin = auth(make_token(None, roles=("operator-admin",), subject="olga"))
    acknowledge = f"{ALERTS}/{alert_id}/acknowledge"

    assert (await http.get(ALERTS)).status_code == 401
    assert (await http.get(ALERTS, headers=customer)).status_code == 200
    assert (await http.get(ALERTS + "?tenant_id=t2", headers=customer)).status_code == 403
    assert (await http.post(acknowledge, headers=customer)).status_code == 403
    assert (await http.post(acknowledge + "?tenant_id=t1", headers=operator)).status_code == 403
    response = await http.post(acknowledge, headers=operator_admin)
    assert response.status_code == 400
    assert error_of(response) == "tenant_required"
    response = await http.post(acknowledge + "?tenant_id=t1", headers=operator_admin)
    assert response.status_code == 200
    assert response.json()["details"]["acknowledged_by"] == "olga"


async def test_operators_read_across_tenants(
    http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: MakeToken
) -> None:
    first = await raise_alert(pool)
    second = await raise_alert(pool, tenant_id="t2")
    operator = auth(make_token(None, roles=("operator",)))
    everything = (await http.get(ALERTS, headers=operator)).json()["alerts"]
    assert [(a["alert_id"], a["tenant_id"]) for a in everything] == [(second, "t2"), (first, "t1")]
    assert set(everything[0]) == ALERT_KEYS | {"tenant_id"}
    one = (await http.get(ALERTS + "?tenant_id=t2", headers=operator)).json()["alerts"]
    assert [a["alert_id"] for a in one] == [second]
    assert set(one[0]) == ALERT_KEYS


async def test_active_alerts_for_the_v2_websocket(fleet: Fleet) -> None:
    pool = fleet.pool
    await fleet.device("dev-2")
    await fleet.rule("temp", ">", 80)
    await fleet.send("dev-1", {"temp": 90})
    await fleet.send("dev-2", {"temp": 90})
    await fleet.send("dev-2", {"temp": 10})  # closed: not active
    await fleet.device("dev-1", tenant_id="t2")
    await fleet.rule("temp", ">", 80, tenant_id="t2")
    await fleet.send("dev-1", {"temp": 90}, tenant_id="t2")

    alerts = await active_alerts(seam(pool), "t1")
    assert [(a["device_id"], a["status"]) for a in alerts] == [("dev-1", "OPEN")]
    assert set(alerts[0]) == ALERT_KEYS
    everywhere = await active_alerts(seam(pool), None)
    assert [a["tenant_id"] for a in everywhere] == ["t2", "t1"]
    assert set(everywhere[0]) == ALERT_KEYS | {"tenant_id"}
    assert len(await active_alerts(seam(pool), None, limit=1)) == 1


@pytest.mark.parametrize(
    "path",
    [
        ALERTS + "/{id}/acknowledge",
        "/api/v1/customer/alert-rules/{id}",
        "/api/v1/customer/devices/{id}",
        "/api/v1/customer/devices/{id}/telemetry",
    ],
)
async def test_an_unknown_id_is_named_escaped_in_the_error(
    http: httpx.AsyncClient, admin: dict[str, str], path: str
) -> None:
    """From the fleet audit: the 404's detail printed the path's id as it came, so a
    right-to-left override or a terminal escape reached whoever prints the error. A
    valid name is shown as it is; anything else quoted and escaped."""
    method = {"acknowledge": "POST", "telemetry": "GET"}.get(path.rsplit("/", 1)[1], "DELETE")
    for raw, shown in (("%E2%80%AEabc", "'\\u202eabc'"), ("%1B%5B31m", "'\\x1b[31m'")):
        response = await http.request(method, path.format(id=raw), headers=admin)
        assert response.status_code == 404
        detail = response.json()["detail"]
        assert shown in detail and "\u202e" not in detail and "\x1b" not in detail
    response = await http.request(method, path.format(id="dev-9"), headers=admin)
    assert "There is no " in response.json()["detail"] and " dev-9 " in response.json()["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/customer/fleet/summary",
        "/api/v1/customer/devices",
        "/api/v1/customer/devices/dev-1",
        "/api/v1/customer/alert-rules",
        ALERTS,
    ],
)
async def test_a_read_refuses_a_parameter_it_does_not_take(
    http: httpx.AsyncClient, admin: dict[str, str], path: str
) -> None:
    """From the fleet audit: the alerts list refused an unknown parameter, the other reads
    ignored it (a misspelt filter answered as if none had been given). Now all refuse."""
    response = await http.get(path, params={"stauts": "active"}, headers=admin)
    assert response.status_code == 400
    assert error_of(response) == "invalid_parameter"
    assert "'stauts'" in response.json()["detail"]
    # tenant_id is taken everywhere (operators name the tenant with it).
    assert (await http.get(path, params={"tenant_id": "t1"}, headers=admin)).status_code in (
        200,
        404,
    )
