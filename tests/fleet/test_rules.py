"""Alert rules evaluated inside the ingest transaction, and their HTTP API."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from pulse.db.database import Database
from pulse.db.pool import create_pool
from pulse.fleet.devices import delete_device
from pulse.fleet.rules import NewRule, UnknownDevice, create_rule, evaluate_alerts
from pulse.fleet.rules import Q as FLEET_QUERIES
from pulse.ingest.writer import TelemetryWriter, Written
from tests.fleet.conftest import Fleet, MakeToken, Notifications, auth, kinds
from tests.support import every_page, seam

RULES = "/api/v1/customer/alert-rules"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.mark.parametrize(
    ("operator", "violating", "within"),
    [
        (">", 10.5, 10),
        (">=", 10, 9.5),
        ("<", 9.5, 10),
        ("<=", 10, 10.5),
        ("==", 10, 10.5),
        ("!=", 11, 10),
    ],
)
async def test_each_operator(fleet: Fleet, operator: str, violating: float, within: float) -> None:
    rule_id = await fleet.rule("temp", operator, 10, severity=4)
    await fleet.send("dev-1", {"temp": within})
    assert await fleet.alerts() == []
    await fleet.send("dev-1", {"temp": violating})
    [alert] = await fleet.alerts()
    assert (alert["alert_type"], alert["rule_id"], alert["status"]) == (
        "THRESHOLD",
        rule_id,
        "OPEN",
    )
    assert (alert["device_id"], alert["severity"], alert["trigger_count"]) == ("dev-1", 4, 1)
    assert alert["details"]["first_value"] == violating
    await fleet.send("dev-1", {"temp": within})
    [alert] = await fleet.alerts()
    assert (alert["status"], alert["closed_reason"]) == ("CLOSED", "recovered")
    assert alert["details"]["recovered_value"] == within


async def test_a_burst_opens_one_alert_and_counts_triggers(
    fleet: Fleet, notifications: Notifications
) -> None:
    await fleet.rule("temp", ">", 80, name="Overheat")
    await fleet.send("dev-1", {"temp": 20})  # ONLINE now: no device change below
    await notifications.since_last()
    await fleet.send("dev-1", {"temp": 81})
    assert kinds(await notifications.since_last()) == [("alerts", "t1"), ("alerts", "*")]
    for value in (82, 83, 84):
        await fleet.send("dev-1", {"temp": value})
    await fleet.send("dev-1", {"temp": 90}, {"temp": 91}, {"humidity": 3})  # one write
    # A new trigger of an active alert is not a change anybody is told about.
    assert kinds(await notifications.since_last()) == []
    [alert] = await fleet.alerts()
    assert alert["status"] == "OPEN"
    assert alert["trigger_count"] == 6
    assert alert["summary"] == "Overheat: temp > 80 on dev-1"
    assert alert["details"]["first_value"] == 81
    assert alert["details"]["last_value"] == 91
    assert alert["last_triggered_at"] > alert["created_at"]

    await fleet.send("dev-1", {"temp": 70})
    assert kinds(await notifications.since_last()) == [("alerts", "t1"), ("alerts", "*")]
    [alert] = await fleet.alerts()
    assert alert["status"] == "CLOSED"
    # The next violation is a new alert.
    await fleet.send("dev-1", {"temp": 85})
    assert [a["status"] for a in await fleet.alerts()] == ["CLOSED", "OPEN"]


async def test_an_acknowledged_alert_keeps_counting_and_recovers(fleet: Fleet) -> None:
    await fleet.rule("temp", ">", 80)
    await fleet.send("dev-1", {"temp": 81})
    await fleet.pool.execute("UPDATE alerts SET status = 'ACKNOWLEDGED'")
    await fleet.send("dev-1", {"temp": 82})
    [alert] = await fleet.alerts()
    assert (alert["status"], alert["trigger_count"]) == ("ACKNOWLEDGED", 2)
    await fleet.send("dev-1", {"temp": 1})
    [alert] = await fleet.alerts()
    assert alert["status"] == "CLOSED"


async def test_the_newest_reading_of_a_write_decides(fleet: Fleet) -> None:
    await fleet.rule("temp", ">", 80)
    # Over and back within one write: kept, as an alert that is already closed.
    await fleet.send("dev-1", {"temp": 90}, {"temp": 95}, {"temp": 20})
    [alert] = await fleet.alerts()
    assert (alert["status"], alert["trigger_count"]) == ("CLOSED", 2)
    assert alert["details"]["last_value"] == 95
    assert alert["details"]["recovered_value"] == 20
    # Back within and over again: open.
    await fleet.send("dev-1", {"temp": 20}, {"temp": 99})
    assert [a["status"] for a in await fleet.alerts()] == ["CLOSED", "OPEN"]
    # An open alert that recovers within a write that also violated: closed,
    # with the write's triggers counted.
    await fleet.send("dev-1", {"temp": 98}, {"temp": 10})
    alert = (await fleet.alerts())[-1]
    assert (alert["status"], alert["trigger_count"]) == ("CLOSED", 2)


async def test_a_rule_for_one_device_ignores_the_others(fleet: Fleet) -> None:
    await fleet.device("dev-2")
    await fleet.rule("temp", ">", 80, device_id="dev-1")
    await fleet.send("dev-2", {"temp": 99})
    assert await fleet.alerts() == []
    await fleet.send("dev-1", {"temp": 99})
    [alert] = await fleet.alerts()
    assert alert["device_id"] == "dev-1"


async def test_rules_of_a_tenant_see_only_its_readings(fleet: Fleet) -> None:
    await fleet.device("dev-1", tenant_id="t2")
    await fleet.rule("temp", ">", 80, tenant_id="t2")
    await fleet.send("dev-1", {"temp": 99})
    assert await fleet.alerts() == []
    await fleet.send("dev-1", {"temp": 99}, tenant_id="t2")
    [alert] = await fleet.alerts()
    assert alert["tenant_id"] == "t2"


async def test_one_rule_per_device_and_many_rules_in_one_pass(fleet: Fleet) -> None:
    await fleet.device("dev-2")
    hot = await fleet.rule("temp", ">", 80)
    wet = await fleet.rule("humidity", ">=", 90)
    await fleet.writer.write(
        [
            fleet.submission("dev-1", {"temp": 81, "humidity": 95}),
            fleet.submission("dev-2", {"temp": 85}),
        ]
    )
    pairs = sorted((a["device_id"], a["rule_id"]) for a in await fleet.alerts(status="OPEN"))
    assert pairs == [("dev-1", hot), ("dev-1", wet), ("dev-2", hot)]


async def test_booleans_and_missing_metrics(fleet: Fleet) -> None:
    await fleet.rule("door_open", "==", 1)
    await fleet.send("dev-1", {"door_open": True})
    [alert] = await fleet.alerts()
    assert alert["status"] == "OPEN"
    # A reading without the metric says nothing about it.
    await fleet.send("dev-1", {"temp": 20})
    assert (await fleet.alerts())[0]["status"] == "OPEN"
    await fleet.send("dev-1", {"door_open": False})
    assert (await fleet.alerts())[0]["status"] == "CLOSED"


async def test_concurrent_writers_never_open_two_active_alerts(
    fleet: Fleet, database_url: str
) -> None:
    """Two writers with their own pools, like two processes: nothing in Python
    orders them, only the database does."""
    await fleet.rule("temp", ">", 80)
    other_pool = await create_pool(database_url, max_size=10)
    try:
        other = Fleet(other_pool)
        other.tokens = fleet.tokens
        writes = [
            writer.send("dev-1", {"temp": 90 + i}) for i in range(20) for writer in (fleet, other)
        ]
        await asyncio.gather(*writes)
    finally:
        await other_pool.close()
    [alert] = await fleet.alerts()
    assert (alert["status"], alert["trigger_count"]) == ("OPEN", 40)


async def test_the_database_allows_one_active_alert_per_rule_and_device(
    fleet: Fleet,
) -> None:
    rule_id = await fleet.rule("temp", ">", 80)
    await fleet.send("dev-1", {"temp": 99})
    insert = """INSERT INTO alerts (tenant_id, device_id, alert_type, rule_id, severity,
                                    summary, status, closed_reason)
                VALUES ('t1', 'dev-1', $1, $2, 3, 'copy', $3, $4)"""
    with pytest.raises(asyncpg.UniqueViolationError):
        await fleet.pool.execute(insert, "THRESHOLD", rule_id, "ACKNOWLEDGED", None)
    await fleet.pool.execute(insert, "THRESHOLD", rule_id, "CLOSED", "manual")
    await fleet.pool.execute(insert, "NO_HEARTBEAT", None, "OPEN", None)
    with pytest.raises(asyncpg.UniqueViolationError):
        await fleet.pool.execute(insert, "NO_HEARTBEAT", None, "OPEN", None)


# -- the HTTP API ----------------------------------------------------------------


@pytest.fixture
def admin(make_token: MakeToken) -> dict[str, str]:
    return auth(make_token("t1", roles=("tenant-admin",), subject="ada"))


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "detail"}
    return str(body["error"])


NEW_RULE = {"name": "Overheat", "metric": "temp", "operator": ">", "threshold": 80, "severity": 4}


async def test_create_list_delete(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str], make_token: MakeToken
) -> None:
    created = await http.post(RULES, json=NEW_RULE, headers=admin)
    assert created.status_code == 201
    rule = created.json()
    assert set(rule) == {
        "rule_id",
        "name",
        "metric",
        "operator",
        "threshold",
        "severity",
        "device_id",
        "created_at",
    }
    assert {k: rule[k] for k in NEW_RULE} == NEW_RULE
    assert rule["device_id"] is None
    assert ISO_Z.match(rule["created_at"])
    scoped = await http.post(RULES, json={**NEW_RULE, "device_id": "dev-1"}, headers=admin)
    assert scoped.status_code == 201

    customer = auth(make_token("t1", roles=("customer",)))
    listed = await http.get(RULES, headers=customer)
    assert listed.status_code == 200
    assert [r["rule_id"] for r in listed.json()["rules"]] == [
        rule["rule_id"],
        scoped.json()["rule_id"],
    ]

    deleted = await http.delete(f"{RULES}/{rule['rule_id']}", headers=admin)
    assert deleted.status_code == 204
    again = await http.delete(f"{RULES}/{rule['rule_id']}", headers=admin)
    assert again.status_code == 404
    assert error_of(again) == "unknown_rule"
    assert len((await http.get(RULES, headers=customer)).json()["rules"]) == 1


async def test_the_server_evaluates_rules_at_ingest(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str]
) -> None:
    assert (await http.post(RULES, json=NEW_RULE, headers=admin)).status_code == 201
    response = await http.post(
        "/ingest/v1/tenant/t1/device/dev-1/telemetry",
        json={"metrics": {"temp": 99.5}},
        headers={"X-Provision-Token": fleet.tokens[("t1", "dev-1")]},
    )
    assert response.status_code == 201
    [alert] = (await http.get("/api/v1/customer/alerts", headers=admin)).json()["alerts"]
    assert alert["alert_type"] == "THRESHOLD"
    assert alert["details"]["first_event_id"] == response.json()["id"]
    assert alert["details"]["first_value"] == 99.5


async def test_deleting_a_rule_closes_its_alerts(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str], notifications: Notifications
) -> None:
    rule_id = (await http.post(RULES, json=NEW_RULE, headers=admin)).json()["rule_id"]
    await fleet.send("dev-1", {"temp": 99})
    await notifications.since_last()
    assert (await http.delete(f"{RULES}/{rule_id}", headers=admin)).status_code == 204
    [alert] = await fleet.alerts()
    assert (alert["status"], alert["closed_reason"], alert["closed_by"]) == (
        "CLOSED",
        "rule_deleted",
        "ada",
    )
    assert kinds(await notifications.since_last()) == [("alerts", "t1"), ("alerts", "*")]
    await fleet.send("dev-1", {"temp": 99})
    assert len(await fleet.alerts()) == 1


async def test_deleting_a_device_closes_its_alerts(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str]
) -> None:
    await fleet.rule("temp", ">", 80)
    await fleet.send("dev-1", {"temp": 99})
    response = await http.delete("/api/v1/customer/devices/dev-1", headers=admin)
    assert response.status_code == 204
    [alert] = await fleet.alerts()
    assert (alert["status"], alert["closed_reason"]) == ("CLOSED", "device_deleted")


async def deletion_waits_or_ends(pool: asyncpg.Pool, deleting: asyncio.Task[Any]) -> None:
    """Until the deletion (or creation) waits on a lock (or has ended: then it did not
    wait)."""
    async with asyncio.timeout(10):
        while not deleting.done():
            waiting = await pool.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock'"""
            )
            if waiting:
                return
            await asyncio.sleep(0.01)


ACTIVE = "SELECT count(*) FROM alerts WHERE device_id = 'dev-1' AND status <> 'CLOSED'"


async def test_a_device_deleted_while_a_write_raises_its_alert_keeps_no_alert_open(
    fleet: Fleet, db: Database
) -> None:
    """Found by an audit: readings in flight while their device was deleted left an
    alert OPEN that nothing could close. The deletion now falls between two of the
    tenant's writes: here one holding the tenant's row, its alert raised, uncommitted."""
    rule_id = await fleet.rule("temp", ">", 80)
    async with fleet.pool.acquire() as conn, conn.transaction():
        await conn.fetchval("SELECT pulse_reserve_event_ids('t1', 1)")
        await conn.execute(
            """INSERT INTO alerts (tenant_id, device_id, alert_type, rule_id, severity, summary,
                                   details)
               VALUES ('t1', 'dev-1', 'THRESHOLD', $1, 3, 'hot', '{}')""",
            rule_id,
        )
        deleting = asyncio.create_task(delete_device(db, "t1", "dev-1"))
        await deletion_waits_or_ends(fleet.pool, deleting)
    assert await deleting
    assert await fleet.pool.fetchval(ACTIVE) == 0


async def test_a_write_that_authenticated_a_device_deleted_since_raises_no_alert(
    fleet: Fleet, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: the device goes, with its alerts, after the write checked its
    token and before the write takes the tenant's row; the write's rules find no device."""
    await fleet.rule("temp", ">", 80)
    checked = TelemetryWriter._authenticate

    async def then_deleted(self: TelemetryWriter, *args: Any) -> Any:
        verdicts = await checked(self, *args)
        assert await delete_device(db, "t1", "dev-1")
        return verdicts

    monkeypatch.setattr(TelemetryWriter, "_authenticate", then_deleted)
    await fleet.send("dev-1", {"temp": 99})
    assert await fleet.pool.fetchval(ACTIVE) == 0


async def test_a_device_deleted_while_the_sweeper_marks_it_keeps_no_alert_open(
    fleet: Fleet, db: Database
) -> None:
    """The sweeper locks the device's row and opens its NO_HEARTBEAT alert in one
    statement; the deletion waits for that row, and used to close the device's alerts
    as of before the wait, missing the sweeper's."""
    async with fleet.pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "SELECT 1 FROM devices WHERE tenant_id = 't1' AND device_id = 'dev-1' FOR UPDATE"
        )
        await conn.execute(
            """INSERT INTO alerts (tenant_id, device_id, alert_type, severity, summary, details)
               VALUES ('t1', 'dev-1', 'NO_HEARTBEAT', 2, 'silent', '{}')"""
        )
        deleting = asyncio.create_task(delete_device(db, "t1", "dev-1"))
        await deletion_waits_or_ends(fleet.pool, deleting)
    assert await deleting
    assert await fleet.pool.fetchval(ACTIVE) == 0


async def test_a_deleted_devices_rules_go_with_it(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str]
) -> None:
    """Found by an audit: a rule for one device outlived it, listed, counted against the
    quota, and judged the readings of a new device made with the same id."""
    scoped = await http.post(RULES, json={**NEW_RULE, "device_id": "dev-1"}, headers=admin)
    every = await http.post(RULES, json={**NEW_RULE, "name": "Any"}, headers=admin)
    await fleet.send("dev-1", {"temp": 99})
    assert len(await fleet.alerts(status="OPEN")) == 2
    assert (await http.delete("/api/v1/customer/devices/dev-1", headers=admin)).status_code == 204
    listed = (await http.get(RULES, headers=admin)).json()["rules"]
    assert [r["rule_id"] for r in listed] == [every.json()["rule_id"]]
    assert {(a["rule_id"], a["status"], a["closed_reason"]) for a in await fleet.alerts()} == {
        (scoped.json()["rule_id"], "CLOSED", "device_deleted"),
        (every.json()["rule_id"], "CLOSED", "device_deleted"),
    }
    await fleet.device("dev-1")  # made again: the old device's rule does not judge it
    await fleet.send("dev-1", {"temp": 99})
    [opened] = await fleet.alerts(status="OPEN")
    assert opened["rule_id"] == every.json()["rule_id"]


async def test_a_rule_for_a_device_being_deleted_waits_and_is_refused(
    fleet: Fleet, db: Database
) -> None:
    """A rule naming a device whose deletion is not yet committed waits for it, then finds
    no device: it is not left behind, for a device that is gone."""
    async with fleet.pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM devices WHERE tenant_id = 't1' AND device_id = 'dev-1'")
        creating = asyncio.create_task(
            create_rule(db, "t1", NewRule.model_validate({**NEW_RULE, "device_id": "dev-1"}))
        )
        await deletion_waits_or_ends(fleet.pool, creating)
    with pytest.raises(UnknownDevice):
        await creating
    assert await fleet.pool.fetchval("SELECT count(*) FROM alert_rules") == 0


async def test_a_device_deleted_while_a_rule_for_it_is_made_takes_the_rule_with_it(
    fleet: Fleet, db: Database
) -> None:
    """The other order: the rule is made first (not yet committed); the deletion waits
    for it and deletes it with the device."""
    async with fleet.pool.acquire() as conn, conn.transaction():
        await conn.fetchrow(
            FLEET_QUERIES["insert_rule"], "t1", "hot", "temp", ">", 80.0, 3, "dev-1"
        )
        deleting = asyncio.create_task(delete_device(db, "t1", "dev-1"))
        await deletion_waits_or_ends(fleet.pool, deleting)
    assert await deleting
    assert await fleet.pool.fetchval("SELECT count(*) FROM alert_rules") == 0


@pytest.mark.parametrize(
    "change",
    [
        {"operator": "=>"},
        {"threshold": "80"},
        {"threshold": True},
        {"severity": 0},
        {"severity": 6},
        {"severity": 2.5},
        {"metric": "temp c"},
        {"name": ""},
        {"device_id": "a/b"},
        {"thresold": 80},
        # PostgreSQL refuses NUL in text; a terminal obeys ESC.
        {"name": "over\u0000heat"},
        {"name": "\u001b[31mred"},
        # A right-to-left override reversed the alert's summary on the dashboard.
        {"name": "Overheat\u202e"},
        {"name": "a\u2067b"},
        # Invisible: "ad<U+200B>min" shows as "admin"; U+2028 breaks the line it is in.
        {"name": "ad\u200bmin"},
        {"name": "a\u2028b"},
        {"name": "hot\u00ad"},
    ],
)
async def test_invalid_rules_are_refused(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str], change: dict[str, object]
) -> None:
    response = await http.post(RULES, json={**NEW_RULE, **change}, headers=admin)
    assert response.status_code == 400
    assert error_of(response) == "invalid_payload"
    assert await fleet.pool.fetchval("SELECT count(*) FROM alert_rules") == 0


@pytest.mark.parametrize(
    "content",
    [
        # The standard library's parser recursed per level: RecursionError, a 500.
        b"[" * 1025 + b"]" * 1025,
        # As deep as a body of at most 64 KiB can be (100,000 levels are now a 413).
        b"[" * 32_000 + b"]" * 32_000,
        # A lone surrogate, which PostgreSQL cannot store.
        orjson.dumps(NEW_RULE)[:-1] + b', "name": "\\ud800"}',
    ],
    ids=["depth-1025", "depth-32000", "lone-surrogate"],
)
async def test_json_that_cannot_be_parsed_or_stored_is_refused(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str], content: bytes
) -> None:
    response = await http.post(
        RULES, content=content, headers={**admin, "Content-Type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert error_of(response) == "invalid_payload"  # as any body that is not JSON
    assert await fleet.pool.fetchval("SELECT count(*) FROM alert_rules") == 0


async def test_a_rule_for_an_unknown_device(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str]
) -> None:
    await fleet.device("dev-9", tenant_id="t2")
    for device in ("nope", "dev-9"):
        response = await http.post(RULES, json={**NEW_RULE, "device_id": device}, headers=admin)
        assert response.status_code == 404
        assert error_of(response) == "unknown_device"


async def test_roles_and_tenants(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str], make_token: MakeToken
) -> None:
    customer = auth(make_token("t1", roles=("customer",)))
    operator = auth(make_token(None, roles=("operator",)))
    operator_admin = auth(make_token(None, roles=("operator-admin",)))
    other_admin = auth(make_token("t2", roles=("tenant-admin",)))

    assert (await http.post(RULES, json=NEW_RULE)).status_code == 401
    assert (await http.post(RULES, json=NEW_RULE, headers=customer)).status_code == 403
    ops = await http.post(RULES + "?tenant_id=t1", json=NEW_RULE, headers=operator)
    assert ops.status_code == 403
    assert (await http.post(RULES, json=NEW_RULE, headers=operator_admin)).status_code == 400
    assert (
        await http.post(RULES + "?tenant_id=t2", json=NEW_RULE, headers=admin)
    ).status_code == 403
    created = await http.post(RULES + "?tenant_id=t1", json=NEW_RULE, headers=operator_admin)
    assert created.status_code == 201
    rule_id = created.json()["rule_id"]

    assert (await http.get(RULES + "?tenant_id=t1", headers=operator)).status_code == 200
    assert (await http.get(RULES, headers=operator)).status_code == 400
    assert (await http.get(RULES, headers=other_admin)).json() == {"rules": [], "next_cursor": None}
    # Another tenant's rule is not found, exactly like one that does not exist.
    for missing in (str(rule_id), "999999", "abc", "99999999999999999999999"):
        response = await http.delete(f"{RULES}/{missing}", headers=other_admin)
        assert response.status_code == 404
        assert error_of(response) == "unknown_rule"
    assert (await http.delete(f"{RULES}/{rule_id}", headers=customer)).status_code == 403
    assert (await http.delete(f"{RULES}/{rule_id}", headers=admin)).status_code == 204


async def test_only_the_readings_of_tenants_with_rules_are_read_back(fleet: Fleet) -> None:
    """A write's rows are read back for its tenants that have a rule, and only for them."""
    await fleet.device("dev-1", tenant_id="t2")
    await fleet.send("dev-1", {"temp": 1}, {"temp": 2})  # t1: ids 1-2, no rule
    await fleet.rule("temp", ">", 80, tenant_id="t2")
    await fleet.send("dev-1", {"temp": 3}, tenant_id="t2")  # t2: id 1
    [plan] = await fleet.pool.fetchval(
        "EXPLAIN (ANALYZE, FORMAT JSON) " + FLEET_QUERIES["evaluate_rules"],
        [
            {"tenant_id": "t1", "first_id": 1, "last_id": 2},
            {"tenant_id": "t2", "first_id": 1, "last_id": 1},
        ],
    )

    def rows_read(node: dict[str, Any]) -> int:
        here = node.get("Relation Name", "").startswith("telemetry")
        own = node["Actual Rows"] * node["Actual Loops"] if here else 0
        return own + sum(rows_read(child) for child in node.get("Plans", []))

    assert rows_read(plan["Plan"]) == 1


async def test_a_write_of_tenants_without_rules_sends_no_rules_statement(fleet: Fleet) -> None:
    """The id reservation tells which tenants have rules, so a write of none costs no
    statement of the rules while it holds its tenants' rows; a rule created before a
    reading was sent applies to it, whether the write reserved its ids first (the
    tenant's first) or last (foreseen)."""
    evaluated: list[str] = []

    def log(query: asyncpg.connection.LoggedQuery) -> None:
        if query.query == FLEET_QUERIES["evaluate_rules"]:
            evaluated.append(query.query)

    async def listen(conn: asyncpg.Connection, written: Written) -> None:
        conn.add_query_logger(log)

    async def stop(conn: asyncpg.Connection, written: Written) -> None:
        conn.remove_query_logger(log)

    writer = TelemetryWriter(seam(fleet.pool), hooks=[listen, evaluate_alerts, stop])

    async def statements_of(value: float) -> int:
        evaluated.clear()
        await writer.write([fleet.submission("dev-1", {"temp": value})])
        return len(evaluated)

    assert await statements_of(90) == 0  # reserved first
    assert await statements_of(91) == 0  # foreseen
    assert writer.ids.foreseen == 1
    await fleet.rule("temp", ">", 80)
    assert await statements_of(92) == 1
    assert writer.ids.foreseen == 2
    [alert] = await fleet.alerts()
    assert (alert["status"], alert["trigger_count"]) == ("OPEN", 1)


async def test_a_foreseen_write_without_rules_commits_with_its_reservation(
    fleet: Fleet, database_url: str
) -> None:
    """A write that foresaw its ids, with no device to mark seen and no tenant with rules,
    sends its reservation and its COMMIT as one string: one round trip, not two, while it
    holds the tenant's row. A rule created since the process last saw the tenant still
    applies: the reservation refuses, and the write is made again with its rules."""
    statements: list[str] = []
    pool = await create_pool(database_url, min_size=1, max_size=1)  # one connection to watch
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda query: statements.append(query.query.strip()))
        writer = TelemetryWriter(seam(pool), rules=evaluate_alerts, seen_precision_s=3600)

        async def sent(value: float) -> list[str]:
            statements.clear()
            await writer.write([fleet.submission("dev-1", {"temp": value})])
            return list(statements)

        first = await sent(90)  # the tenant's first: reserves first, marks the device seen
        assert first[-1] == "COMMIT"
        second = await sent(91)  # foreseen, and the device fresh
        assert writer.ids.foreseen == 1
        assert second[-1].startswith("SELECT pulse_take_foreseen_ids(ARRAY['t1']")
        assert second[-1].endswith("; COMMIT") and "COMMIT" not in second
        assert await fleet.alerts() == []

        await fleet.rule("temp", ">", 80)
        third = await sent(92)  # refused for the rule, made again reserving first
        assert writer.ids.wrong == 1
        assert third.count("COMMIT") == 1 and third[-1] == "COMMIT"
        [alert] = await fleet.alerts()
        assert (alert["status"], alert["trigger_count"]) == ("OPEN", 1)
        fourth = await sent(93)  # the tenant has rules: its reservation stands apart
        assert writer.ids.wrong == 1 and fourth[-1] == "COMMIT"
        assert not any(s.startswith("SELECT pulse_take_foreseen_ids") for s in fourth)
        [alert] = await fleet.alerts()
        assert alert["trigger_count"] == 2
    finally:
        await pool.close()
    ids = [r["id"] for r in await fleet.pool.fetch("SELECT id FROM telemetry ORDER BY id")]
    assert ids == [1, 2, 3, 4]


# -- the list, a page at a time --------------------------------------------------


async def rule_pages(
    http: httpx.AsyncClient, headers: dict[str, str], **params: str
) -> list[list[int]]:
    """The rule ids of each page, following next_cursor to the end."""
    return await every_page(http, RULES, "rules", "rule_id", headers, **params)


async def test_rule_pages_cover_every_rule_once_oldest_first(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str]
) -> None:
    await fleet.device("dev-1", tenant_id="t2")
    ids = [await fleet.rule("temp", ">", i, name=f"r{i}") for i in range(8)]
    await fleet.rule("temp", ">", 1, tenant_id="t2")  # between t1's in id order
    ids += [await fleet.rule("temp", ">", 9, name="r9")]
    assert await rule_pages(http, admin, limit="3") == [ids[0:3], ids[3:6], ids[6:9]]
    # Without a limit, a tenant's every rule (1,000 at most by default) in one answer.
    assert await rule_pages(http, admin) == [ids]
    # Rules added or deleted between pages do not shift the pages that follow.
    first = (await http.get(RULES, params={"limit": "3"}, headers=admin)).json()
    assert (await http.delete(f"{RULES}/{ids[0]}", headers=admin)).status_code == 204
    assert (await http.delete(f"{RULES}/{ids[3]}", headers=admin)).status_code == 204
    newer = await fleet.rule("temp", ">", 10, name="r10")
    rest = await rule_pages(http, admin, limit="3", cursor=first["next_cursor"])
    assert rest == [ids[4:7], [*ids[7:], newer]]


async def test_the_rule_list_refuses_bad_limits_and_cursors(
    http: httpx.AsyncClient, fleet: Fleet, admin: dict[str, str]
) -> None:
    await fleet.pool.execute(
        """INSERT INTO alert_rules (tenant_id, name, metric, operator, threshold, severity)
           SELECT 't1', 'r' || i, 'temp', '>', i, 3 FROM generate_series(1, 1001) AS i"""
    )
    # No limit: a page of 1,000, which holds every rule of a tenant within the default
    # quota; a tenant allowed more (PULSE_MAX_RULES_PER_TENANT) pages on.
    first = (await http.get(RULES, headers=admin)).json()
    assert len(first["rules"]) == 1000 and first["next_cursor"] is not None
    last = (await http.get(RULES, params={"cursor": first["next_cursor"]}, headers=admin)).json()
    assert [r["name"] for r in last["rules"]] == ["r1001"] and last["next_cursor"] is None
    bad = [
        {"limit": "1001"},
        {"limit": "0"},
        {"limit": "-3"},
        {"limit": "all"},
        {"cursor": "0"},
        {"cursor": "-1"},
        {"cursor": "r5"},
        {"cursor": "9" * 20},
        {"offset": "3"},
    ]
    for params in bad:
        response = await http.get(RULES, params=params, headers=admin)
        assert response.status_code == 400, params
        assert error_of(response) == "invalid_parameter", params


async def test_a_rule_cursor_never_reaches_another_tenants_rules(
    http: httpx.AsyncClient, fleet: Fleet, make_token: MakeToken
) -> None:
    await fleet.device("dev-1", tenant_id="t2")
    t1 = [await fleet.rule("temp", ">", 1, tenant_id="t1") for _ in range(3)]
    t2 = [await fleet.rule("temp", ">", 1, tenant_id="t2") for _ in range(2)]
    t1 += [await fleet.rule("temp", ">", 1, tenant_id="t1")]
    reader = auth(make_token("t2", roles=("customer",)))
    assert await rule_pages(http, reader, limit="1") == [[t2[0]], [t2[1]]]
    # t1's rule ids as cursors only position t2's list.
    assert await rule_pages(http, reader, cursor=str(t1[0])) == [t2]
    assert await rule_pages(http, reader, cursor=str(t1[-1])) == [[]]
    operator = auth(make_token(None, roles=("operator",)))
    assert await rule_pages(http, operator, tenant_id="t1", cursor=str(t2[0])) == [[t1[-1]]]


async def test_a_rule_page_is_read_from_the_cursor_on_through_an_index(fleet: Fleet) -> None:
    """The cursor bounds the index scan (not a filter over the tenant's every rule),
    also in the generic plan a prepared statement gets after a few runs. (PostgreSQL
    may still sort what it read: at most the tenant's rules after the cursor.)"""
    await fleet.pool.execute(
        """INSERT INTO tenants (tenant_id) SELECT 't' || i FROM generate_series(2, 50) AS i
           ON CONFLICT DO NOTHING"""
    )
    await fleet.pool.execute(
        """INSERT INTO alert_rules (tenant_id, name, metric, operator, threshold, severity)
           SELECT 't' || (1 + i % 50), 'r', 'temp', '>', i, 3
             FROM generate_series(1, 50000) AS i"""
    )
    await fleet.pool.execute("ANALYZE alert_rules")
    async with fleet.pool.acquire() as conn:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        await conn.execute(f"PREPARE page (text, bigint, bigint) AS {FLEET_QUERIES['list_rules']}")
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) EXECUTE page ('t1', 40000, 1001)")
        await conn.execute("DEALLOCATE page; RESET plan_cache_mode")
    nodes = list(_plan_nodes(plan[0]["Plan"]))
    assert "Seq Scan" not in {node["Node Type"] for node in nodes}, nodes
    [scan] = [node for node in nodes if "Index Cond" in node]
    assert scan["Index Name"] == "alert_rules_tenant_rule", scan
    assert "rule_id) >" in scan["Index Cond"] and "tenant_id =" in scan["Index Cond"], scan


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


class _Explained:
    """A write's connection that runs each rule statement once more first, under
    EXPLAIN ANALYZE in a savepoint rolled back, and keeps its plan."""

    STATEMENTS = ("evaluate_rules", "apply_verdicts")

    def __init__(self, conn: asyncpg.Connection, plans: dict[str, list[Any]]) -> None:
        self._conn = conn
        self._plans = plans

    async def _explain(self, query: str, args: tuple[Any, ...]) -> None:
        for name in self.STATEMENTS:
            if query == FLEET_QUERIES[name]:
                await self._conn.execute("SAVEPOINT explained")
                plan = await self._conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *args)
                await self._conn.execute("ROLLBACK TO SAVEPOINT explained")
                self._plans.setdefault(name, []).append(plan[0]["Plan"])

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        await self._explain(query, args)
        return list(await self._conn.fetch(query, *args))

    async def execute(self, query: str, *args: Any) -> str:
        await self._explain(query, args)
        return str(await self._conn.execute(query, *args))


def _rules_read(plan: dict[str, Any]) -> int:
    """How many rows of alert_rules a plan read: kept or filtered out, in every loop."""
    return sum(
        round(
            (
                node["Actual Rows"]
                + node.get("Rows Removed by Filter", 0)
                + node.get("Rows Removed by Index Recheck", 0)
            )
            * node["Actual Loops"]
        )
        for node in _plan_nodes(plan)
        if node.get("Relation Name") == "alert_rules"
    )


def _batch_rows(plan: dict[str, Any]) -> int:
    """How many rows of the write's readings (the CTE `batch`) a plan went through."""
    return sum(
        round(node["Actual Rows"] * node["Actual Loops"])
        for node in _plan_nodes(plan)
        if node.get("CTE Name") == "batch"
    )


async def test_a_write_s_rule_statements_cost_readings_plus_rules_plus_pairs(
    fleet: Fleet,
) -> None:
    """Security audit M1: 100 readings against 1000 rules took 24 s. Each (rule,
    device) pair that broke looked through the whole write for the device's newest
    reading (pairs x readings), and a verdict's rule could be found by tenant alone
    (the tenant's rules read for each verdict: 499,500 rows filtered out for one
    reading). Whatever the plan (the tables here have no statistics, as on the audit's
    machine), a write of 10 readings breaking 300 rules reads each rule once, goes
    through its readings a few times, not once per pair, and finds each verdict's
    rule by its key."""
    await fleet.pool.execute(
        """INSERT INTO alert_rules (tenant_id, name, metric, operator, threshold, severity)
           SELECT 't1', 'other ' || i, 'temp', '>', 50 + i % 10, 3
             FROM generate_series(1, 297) AS i"""
    )
    hot = await fleet.rule("temp", ">", 80)
    await fleet.rule("temp", "<", -40)
    await fleet.rule("temp", ">", 80, device_id="dev-1", name="this device's")
    plans: dict[str, list[Any]] = {}

    async def explained(conn: asyncpg.Connection, written: Written) -> None:
        await evaluate_alerts(_Explained(conn, plans), written)  # type: ignore[arg-type]

    writer = TelemetryWriter(seam(fleet.pool), rules=explained)
    readings = 10
    for value in (90, 95, 20):  # raised, bumped, recovered
        await writer.write([fleet.submission("dev-1", {"temp": value, "humidity": 40})] * readings)
    alerts = await fleet.alerts(rule_id=hot)
    assert [(a["status"], a["trigger_count"]) for a in alerts] == [("CLOSED", 20)]
    assert [len(plans[name]) for name in _Explained.STATEMENTS] == [3, 3]
    rules, pairs = 300, 299  # the rule on temp < -40 is never broken
    evaluated = [(_rules_read(p), _batch_rows(p)) for p in plans["evaluate_rules"]]
    # Each rule once, the active alerts' rules by key (the third write), the
    # tenant's rule check; the readings a few times each.
    for (rules_read, batch_rows), active in zip(evaluated, (0, pairs, pairs), strict=True):
        assert rules_read <= rules + active + 5, evaluated
        assert batch_rows <= 5 * readings, evaluated
    applied = [_rules_read(p) for p in plans["apply_verdicts"]]
    assert all(rows <= 2 * pairs for rows in applied), applied
