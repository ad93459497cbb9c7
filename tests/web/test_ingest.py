"""The ingest HTTP API over a real socket, checked against the rows in the table."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import orjson
import pytest

from pulse.config import Settings
from tests.ingest.conftest import stored_rows
from tests.support import provision_device, running_server

URL = "/ingest/v1/tenant/{tenant}/device/{device}/{kind}"
BATCH = "/ingest/v1/batch"


def telemetry_url(tenant: str = "t1", device: str = "dev-1") -> str:
    return URL.format(tenant=tenant, device=device, kind="telemetry")


def heartbeat_url(tenant: str = "t1", device: str = "dev-1") -> str:
    return URL.format(tenant=tenant, device=device, kind="heartbeat")


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code
    assert body["detail"] and "Traceback" not in body["detail"]


async def test_reading_is_stored_and_its_id_returned(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str
) -> None:
    body = {"ts": "2026-01-02T03:04:05.678Z", "metrics": {"temp": 21.5, "door": True}, "seq": 9}
    first = await http.post(telemetry_url(), json=body, headers={"X-Provision-Token": token})
    assert first.status_code == 201, first.text
    assert first.json() == {"id": 1}
    row = await pool.fetchrow("SELECT * FROM telemetry WHERE tenant_id = 't1' AND id = 1")
    assert row["device_id"] == "dev-1"
    assert row["device_time"] == datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert row["metrics"] == {"temp": 21.5, "door": True}
    assert row["seq"] == 9
    second = await http.post(
        telemetry_url(), json={"metrics": {"temp": 22}}, headers={"X-Provision-Token": token}
    )
    assert second.json() == {"id": 2}
    assert await stored_rows(pool) == 2


async def test_missing_ts_is_the_receive_time(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str
) -> None:
    before = datetime.now(UTC)
    response = await http.post(
        telemetry_url(), json={"metrics": {"v": 1}}, headers={"X-Provision-Token": token}
    )
    after = datetime.now(UTC)
    assert response.status_code == 201
    device_time = await pool.fetchval(
        "SELECT device_time FROM telemetry WHERE id = $1", response.json()["id"]
    )
    assert before <= device_time <= after


async def test_reading_marks_the_device_online(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str
) -> None:
    await http.post(
        telemetry_url(), json={"metrics": {"v": 1}}, headers={"X-Provision-Token": token}
    )
    row = await pool.fetchrow("SELECT status, last_seen_at FROM devices WHERE device_id = 'dev-1'")
    assert row["status"] == "ONLINE"
    assert datetime.now(UTC) - row["last_seen_at"] < timedelta(seconds=10)


# Computed when the tests are collected: a day ahead stays more than 5 minutes
# ahead however long the suite runs before these tests (10 minutes did not).
FUTURE = "2999-01-01T00:00:00+00:00"  # a fixed value: test ids must not change between runs


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"metrics": {"v": 1}', "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"ts": "2026-01-01T00:00:00Z"}', "metrics is missing"),
        (b'{"metrics": {}}', "empty"),
        (b'{"metrics": [1]}', "must be a JSON object"),
        (b'{"metrics": {"bad name": 1}}', "is invalid"),
        (b'{"metrics": {"v": "1"}}', "finite number or a boolean"),
        (b'{"metrics": {"v": null}}', "finite number or a boolean"),
        (b'{"metrics": {"v": {"x": 1}}}', "finite number or a boolean"),
        (b'{"metrics": {"v": NaN}}', "not valid JSON"),
        (b'{"metrics": {"v\xff": 1}}', "The payload is not valid UTF-8"),
        # Valid JSON that no double holds: said so, and of which metric, not "not valid JSON".
        (
            b'{"metrics": {"v": 1e400}}',
            "Metric 'v' must be a finite number or a boolean, not a number beyond the range",
        ),
        (
            b'{"metrics": {"v": 1' + b"0" * 400 + b"}}",
            "Metric 'v' must be a finite number or a boolean, not a number beyond the range",
        ),
        (b'{"metrics": {"v": 1}, "seq": -1e400}', "seq must be an integer, not a number beyond"),
        (orjson.dumps({"metrics": {f"m{i}": i for i in range(201)}}), "at most 200"),
        (orjson.dumps({"ts": FUTURE, "metrics": {"v": 1}}), "ahead of the server clock"),
        (b'{"ts": "soon", "metrics": {"v": 1}}', "ISO-8601"),
        (b'{"metrics": {"v": 1}, "seq": true}', "seq must be an integer"),
        (b'{"metrics": {"v": 1}, "extra": 1}', "Unknown field"),
    ],
)
async def test_invalid_payload_stores_nothing(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str, content: bytes, words: str
) -> None:
    response = await http.post(
        telemetry_url(),
        content=content,
        headers={"X-Provision-Token": token, "Content-Type": "application/json"},
    )
    assert_error(response, 400, "invalid_payload")
    assert words in response.json()["detail"]
    assert await stored_rows(pool) == 0


EDGES_OF_THE_CALENDAR = ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"]


@pytest.mark.parametrize("ts", EDGES_OF_THE_CALENDAR)
@pytest.mark.parametrize("headers", [{}, {"X-Provision-Token": "pdt_anything"}])
async def test_ts_beyond_the_calendar_in_utc_is_invalid_payload(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str, ts: str, headers: dict[str, str]
) -> None:
    """Before any token is checked: through the fast path (Content-Length) and through
    Quart (chunked), with no token or a wrong one."""
    content = orjson.dumps({"ts": ts, "metrics": {"v": 1}})

    async def chunked() -> AsyncIterator[bytes]:
        yield content

    for body in (content, chunked()):
        response = await http.post(telemetry_url(), content=body, headers=headers)
        assert_error(response, 400, "invalid_payload")
        assert "outside the years 1 to 9999" in response.json()["detail"]
    assert await stored_rows(pool) == 0


async def test_ts_beyond_the_calendar_rejects_only_its_batch_message(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str
) -> None:
    def message(**fields: object) -> dict[str, object]:
        return {"tenant_id": "t1", "device_id": "dev-1", "provision_token": token} | fields

    messages = [message(ts=ts, metrics={"v": 0}) for ts in EDGES_OF_THE_CALENDAR]
    messages.insert(1, message(metrics={"v": 1}))
    response = await http.post(BATCH, json={"messages": messages})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "accepted": 1,
        "rejected": 2,
        "results": [
            {"index": 0, "status": "rejected", "reason": "invalid_payload"},
            {"index": 1, "status": "accepted", "id": 1},
            {"index": 2, "status": "rejected", "reason": "invalid_payload"},
        ],
    }
    assert await pool.fetchval("SELECT metrics FROM telemetry") == {"v": 1}


BEYOND_A_DOUBLE = [b"1e400", b"-1e400", b"1" + b"0" * 400, b"1" + b"0" * 5000]


@pytest.mark.parametrize(
    "number", BEYOND_A_DOUBLE, ids=["1e400", "-1e400", "401 digits", "5001 digits"]
)
@pytest.mark.parametrize("field", ["metrics", "seq"])
async def test_a_number_beyond_a_double_rejects_only_its_batch_message(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str, number: bytes, field: str
) -> None:
    """From the integrity audit (LOW-1): one such number (valid JSON, but no double
    holds it) made the whole batch a 400 envelope error, refusing every other device's
    valid reading with it, where ``"hot"`` in its place refused only its own message."""
    other = await provision_device(pool, "t1", "dev-2")
    value = b'{"x": ' + number + b"}" if field == "metrics" else b'{"x": 1}, "seq": ' + number
    poisoned = (
        b'{"tenant_id": "t1", "device_id": "dev-1", "provision_token": "'
        + token.encode()
        + b'", "metrics": '
        + value
        + b"}"
    )
    valid = orjson.dumps(
        {"tenant_id": "t1", "device_id": "dev-2", "provision_token": other, "metrics": {"x": 2}}
    )
    for body in (poisoned + b", " + valid, valid + b", " + poisoned):
        response = await http.post(BATCH, content=b'{"messages": [' + body + b"]}")
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert (response.json()["accepted"], response.json()["rejected"]) == (1, 1)
        assert {r["status"]: r.get("reason") for r in results} == {
            "rejected": "invalid_payload",
            "accepted": None,
        }
    rows = await pool.fetch("SELECT device_id, metrics FROM telemetry ORDER BY id")
    assert [(row["device_id"], row["metrics"]) for row in rows] == [("dev-2", {"x": 2})] * 2
    # Sent alone, the message is refused with what is wrong, and where.
    alone = await http.post(
        telemetry_url(),
        content=b'{"metrics": ' + value + b"}",
        headers={"X-Provision-Token": token, "Content-Type": "application/json"},
    )
    assert_error(alone, 400, "invalid_payload")
    assert "beyond the range of a double" in alone.json()["detail"]
    assert ("Metric 'x'" if field == "metrics" else "seq") in alone.json()["detail"]


@pytest.mark.parametrize("after", [b"NaN", b"-Infinity", b'"\\ud800"', b'"\\udc00 and more"'])
async def test_a_number_beyond_a_double_lets_in_nothing_else_that_is_not_json(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str, after: bytes
) -> None:
    """A body refused for such a number is decoded again, by a parser that takes what
    orjson refuses (NaN, Infinity, a lone surrogate in an escape): with one of those
    after the number, the body is still not JSON, and the envelope is refused whole."""
    body = (
        b'{"messages": [{"tenant_id": "t1", "device_id": "dev-1", "provision_token": "'
        + token.encode()
        + b'", "metrics": {"x": 1e400, "y": '
        + after
        + b"}}]}"
    )
    response = await http.post(BATCH, content=body)
    assert_error(response, 400, "invalid_payload")
    assert "not valid JSON" in response.json()["detail"]
    assert await stored_rows(pool) == 0


@pytest.mark.parametrize(
    ("tenant", "device"),
    [("bad%20tenant", "dev-1"), ("t1", "x" * 65), ("t1", "d%2Fe"), ("t%C3%A9", "dev-1")],
)
async def test_invalid_names_in_the_path(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str, tenant: str, device: str
) -> None:
    headers = {"X-Provision-Token": token}
    for url in (telemetry_url(tenant, device), heartbeat_url(tenant, device)):
        response = await http.post(url, json={"metrics": {"v": 1}}, headers=headers)
        assert_error(response, 400, "invalid_payload")
    assert await stored_rows(pool) == 0


@pytest.mark.parametrize("headers", [{}, {"X-Provision-Token": ""}, {"X-Provision-Token": "pdt_x"}])
async def test_missing_or_wrong_token(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str, headers: dict[str, str]
) -> None:
    missing = "The device's provision token is missing: send it in the X-Provision-Token header."
    response = await http.post(telemetry_url(), json={"metrics": {"v": 1}}, headers=headers)
    assert_error(response, 401, "invalid_device_token")
    assert (response.json()["detail"] == missing) == (not headers.get("X-Provision-Token"))
    response = await http.post(heartbeat_url(), headers=headers)
    assert_error(response, 401, "invalid_device_token")
    assert (response.json()["detail"] == missing) == (not headers.get("X-Provision-Token"))
    assert await stored_rows(pool) == 0
    assert await pool.fetchval("SELECT last_seen_at FROM devices") is None


@pytest.mark.parametrize(("tenant", "device"), [("t1", "dev-404"), ("t404", "dev-1")])
async def test_unknown_device(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str, tenant: str, device: str
) -> None:
    headers = {"X-Provision-Token": token}
    response = await http.post(
        telemetry_url(tenant, device), json={"metrics": {"v": 1}}, headers=headers
    )
    assert_error(response, 404, "unknown_device")
    response = await http.post(heartbeat_url(tenant, device), headers=headers)
    assert_error(response, 404, "unknown_device")
    assert await stored_rows(pool) == 0


async def test_token_of_another_tenant(http: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    token_a = await provision_device(pool, "tenant-a", "sensor")
    await provision_device(pool, "tenant-b", "sensor")
    await provision_device(pool, "tenant-b", "other")
    headers = {"X-Provision-Token": token_a}
    same_name = await http.post(
        telemetry_url("tenant-b", "sensor"), json={"metrics": {"v": 1}}, headers=headers
    )
    assert_error(same_name, 401, "invalid_device_token")
    other = await http.post(
        telemetry_url("tenant-b", "other"), json={"metrics": {"v": 1}}, headers=headers
    )
    assert_error(other, 401, "invalid_device_token")
    missing = await http.post(
        telemetry_url("tenant-b", "ghost"), json={"metrics": {"v": 1}}, headers=headers
    )
    assert_error(missing, 404, "unknown_device")
    batch = await http.post(
        BATCH,
        json={
            "messages": [
                {
                    "tenant_id": "tenant-b",
                    "device_id": "sensor",
                    "provision_token": token_a,
                    "metrics": {"v": 1},
                },
            ]
        },
    )
    assert batch.status_code == 400
    assert batch.json()["results"] == [
        {"index": 0, "status": "rejected", "reason": "invalid_device_token"}
    ]
    assert await stored_rows(pool) == 0


BIG = 1024 * 1024 + 1


async def test_body_over_1_mib_with_content_length(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str
) -> None:
    content = b'{"metrics": {"v": 1}, "pad": "' + b"x" * BIG + b'"}'
    for url in (telemetry_url(), heartbeat_url(), BATCH):
        response = await http.post(url, content=content, headers={"X-Provision-Token": token})
        assert_error(response, 413, "payload_too_large")
    assert await stored_rows(pool) == 0


async def test_chunked_body_over_1_mib(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"metrics": {"v": 1}, "pad": "'
        for _ in range(BIG // 65536 + 1):
            yield b"x" * 65536
        yield b'"}'

    for url in (telemetry_url(), BATCH):
        response = await http.post(url, content=chunks(), headers={"X-Provision-Token": token})
        assert response.request.headers.get("Transfer-Encoding") == "chunked"
        assert "Content-Length" not in response.request.headers
        assert_error(response, 413, "payload_too_large")
    assert await stored_rows(pool) == 0


async def test_body_of_exactly_1_mib_is_accepted(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str
) -> None:
    head = b'{"metrics": {"v": 1}}'
    content = head + b" " * (1024 * 1024 - len(head))
    response = await http.post(
        telemetry_url(), content=content, headers={"X-Provision-Token": token}
    )
    assert response.status_code == 201, response.text


async def test_rate_limit(settings: Settings, pool: asyncpg.Pool, token: str) -> None:
    limited = dataclasses.replace(settings, ingest_burst_per_device=3, ingest_rate_per_device=0.25)
    other_token = await provision_device(pool, "t1", "dev-2")
    async with running_server(limited) as url, httpx.AsyncClient(base_url=url) as http:
        headers = {"X-Provision-Token": token}
        for _ in range(3):
            ok = await http.post(telemetry_url(), json={"metrics": {"v": 1}}, headers=headers)
            assert ok.status_code == 201
        over = await http.post(telemetry_url(), json={"metrics": {"v": 1}}, headers=headers)
        assert_error(over, 429, "rate_limited")
        assert int(over.headers["Retry-After"]) >= 1
        beat = await http.post(heartbeat_url(), headers=headers)
        assert_error(beat, 429, "rate_limited")
        # Another device of the tenant has its own bucket.
        other = await http.post(
            telemetry_url(device="dev-2"),
            json={"metrics": {"v": 1}},
            headers={"X-Provision-Token": other_token},
        )
        assert other.status_code == 201
        # Requests with a wrong token do not spend the device's budget.
        for _ in range(5):
            wrong = await http.post(
                telemetry_url(device="dev-2"),
                json={"metrics": {"v": 1}},
                headers={"X-Provision-Token": "pdt_wrong"},
            )
            assert wrong.status_code == 401
        in_batch = await http.post(
            BATCH,
            json={
                "messages": [
                    {
                        "tenant_id": "t1",
                        "device_id": "dev-2",
                        "provision_token": other_token,
                        "metrics": {"v": i},
                    }
                    for i in range(3)
                ]
            },
        )
        assert [r["status"] for r in in_batch.json()["results"]] == [
            "accepted",
            "accepted",
            "rejected",
        ]
        assert in_batch.json()["results"][2]["reason"] == "rate_limited"
        # When to resend it: up to 4 s (1 token at 0.25/s, less what came back since).
        assert in_batch.status_code == 200 and 1 <= int(in_batch.headers["Retry-After"]) <= 4
        refused = await http.post(
            "/ingest/v1/batch",
            json={
                "messages": [
                    {"tenant_id": "t1", "device_id": "dev-2", "provision_token": other_token,
                     "metrics": {"v": 9}}
                ]
            },
        )  # fmt: skip
        assert refused.status_code == 400 and int(refused.headers["Retry-After"]) >= 1
    assert await stored_rows(pool) == 6


async def test_tenant_rate_limit(settings: Settings, pool: asyncpg.Pool, token: str) -> None:
    limited = dataclasses.replace(settings, ingest_burst_per_tenant=3, ingest_rate_per_tenant=0.25)
    second = await provision_device(pool, "t1", "dev-2")
    other_tenant = await provision_device(pool, "t2", "dev-1")
    async with running_server(limited) as url, httpx.AsyncClient(base_url=url) as http:
        for device, device_token in [("dev-1", token), ("dev-2", second), ("dev-1", token)]:
            ok = await http.post(
                telemetry_url(device=device),
                json={"metrics": {"v": 1}},
                headers={"X-Provision-Token": device_token},
            )
            assert ok.status_code == 201
        # dev-2 has sent one reading, far under its own limit: the tenant is over.
        over = await http.post(
            telemetry_url(device="dev-2"),
            json={"metrics": {"v": 1}},
            headers={"X-Provision-Token": second},
        )
        assert_error(over, 429, "rate_limited")
        assert "tenant" in over.json()["detail"]
        assert int(over.headers["Retry-After"]) >= 1
        mixed = await http.post(
            BATCH,
            json={
                "messages": [
                    {
                        "tenant_id": t,
                        "device_id": "dev-1",
                        "provision_token": tok,
                        "metrics": {"v": 1},
                    }
                    for t, tok in [("t1", token), ("t2", other_tenant), ("t2", other_tenant)]
                ]
            },
        )
        results = mixed.json()["results"]
        assert [r["status"] for r in results] == ["rejected", "accepted", "accepted"]
        assert results[0]["reason"] == "rate_limited"
    assert await pool.fetchval("SELECT count(*) FROM telemetry WHERE tenant_id = 't1'") == 3
    assert await pool.fetchval("SELECT count(*) FROM telemetry WHERE tenant_id = 't2'") == 2


async def test_heartbeat_marks_device_seen_and_stores_nothing(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str
) -> None:
    before = datetime.now(UTC)
    response = await http.post(heartbeat_url(), headers={"X-Provision-Token": token})
    assert response.status_code == 204
    assert response.content == b""
    row = await pool.fetchrow("SELECT status, last_seen_at FROM devices WHERE device_id = 'dev-1'")
    assert row["status"] == "ONLINE"
    assert row["last_seen_at"] >= before - timedelta(seconds=1)
    with_body = await http.post(
        heartbeat_url(), json={"battery": 80}, headers={"X-Provision-Token": token}
    )
    assert with_body.status_code == 204
    assert await stored_rows(pool) == 0
    assert await pool.fetchval("SELECT last_event_id FROM tenants WHERE tenant_id = 't1'") == 0


async def test_batch_with_good_and_bad_messages_across_tenants(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    t1_d1 = await provision_device(pool, "t1", "dev-1")
    t1_d2 = await provision_device(pool, "t1", "dev-2")
    t2_d1 = await provision_device(pool, "t2", "dev-1")

    def message(tenant: str, device: str, token: str | None, **fields: object) -> dict[str, object]:
        base: dict[str, object] = {"tenant_id": tenant, "device_id": device, "metrics": {"v": 1}}
        if token is not None:
            base["provision_token"] = token
        return base | fields

    messages: list[object] = [
        message("t2", "dev-1", t2_d1, seq=1),
        message("t1", "dev-1", t1_d1, metrics={"temp": 20}),
        message("t1", "dev-1", t1_d1, metrics={"temp": "hot"}),
        message("t1", "dev-2", t1_d1),
        message("t1", "dev-9", t1_d1),
        "not an object",
        message("t1", "dev-2", None),
        message("t1", "dev-2", t1_d2, ts="2026-01-01T00:00:00Z"),
        message("bad tenant", "dev-1", t1_d1),
        message("t2", "dev-1", t2_d1, seq=2),
        message("t1", "dev-1", t1_d1, ts=FUTURE),
    ]
    response = await http.post(BATCH, json={"messages": messages})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "accepted": 4,
        "rejected": 7,
        "results": [
            {"index": 0, "status": "accepted", "id": 1},
            {"index": 1, "status": "accepted", "id": 1},
            {"index": 2, "status": "rejected", "reason": "invalid_payload"},
            {"index": 3, "status": "rejected", "reason": "invalid_device_token"},
            {"index": 4, "status": "rejected", "reason": "unknown_device"},
            {"index": 5, "status": "rejected", "reason": "invalid_payload"},
            {"index": 6, "status": "rejected", "reason": "invalid_device_token"},
            {"index": 7, "status": "accepted", "id": 2},
            {"index": 8, "status": "rejected", "reason": "invalid_payload"},
            {"index": 9, "status": "accepted", "id": 2},
            {"index": 10, "status": "rejected", "reason": "invalid_payload"},
        ],
    }
    rows = await pool.fetch(
        "SELECT tenant_id, id, device_id, metrics, seq FROM telemetry ORDER BY tenant_id, id"
    )
    assert [tuple(row) for row in rows] == [
        ("t1", 1, "dev-1", {"temp": 20}, None),
        ("t1", 2, "dev-2", {"v": 1}, None),
        ("t2", 1, "dev-1", {"v": 1}, 1),
        ("t2", 2, "dev-1", {"v": 1}, 2),
    ]
    statuses = await pool.fetch("SELECT tenant_id, device_id, status FROM devices ORDER BY 1, 2")
    assert [tuple(row) for row in statuses] == [
        ("t1", "dev-1", "ONLINE"),
        ("t1", "dev-2", "ONLINE"),
        ("t2", "dev-1", "ONLINE"),
    ]


async def test_batch_with_no_good_message_is_400(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str
) -> None:
    messages = [
        {"tenant_id": "t1", "device_id": "dev-1", "provision_token": "pdt_no", "metrics": {"v": 1}},
        {"tenant_id": "t1", "device_id": "dev-1", "provision_token": token, "metrics": {}},
    ]
    response = await http.post(BATCH, json={"messages": messages})
    assert response.status_code == 400
    assert response.json() == {
        "accepted": 0,
        "rejected": 2,
        "results": [
            {"index": 0, "status": "rejected", "reason": "invalid_device_token"},
            {"index": 1, "status": "rejected", "reason": "invalid_payload"},
        ],
    }
    assert await stored_rows(pool) == 0


@pytest.mark.parametrize(
    "content",
    [
        b"{",
        b"[]",
        b'{"messages": {}}',
        b'{"messages": []}',
        b'{"message": [{}]}',
        b'{"messages": [{}], "extra": 1}',
    ],
)
async def test_batch_envelope_errors(
    http: httpx.AsyncClient, pool: asyncpg.Pool, content: bytes
) -> None:
    response = await http.post(BATCH, content=content)
    assert_error(response, 400, "invalid_payload")


async def test_batch_of_1000_is_accepted_and_1001_is_not(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str
) -> None:
    message = {
        "tenant_id": "t1",
        "device_id": "dev-1",
        "provision_token": token,
        "metrics": {"v": 1},
    }
    too_many = await http.post(BATCH, json={"messages": [message] * 1001})
    assert_error(too_many, 400, "invalid_payload")
    assert "1001" in too_many.json()["detail"]
    assert await stored_rows(pool) == 0
    # One device's backlog (issue #19 item 1): a night of readings, a full batch of
    # them backdated, is accepted whole at the default limits.
    start = datetime.now(UTC) - timedelta(hours=8)
    messages = [
        message | {"metrics": {"i": i}, "ts": (start + timedelta(seconds=i)).isoformat()}
        for i in range(1000)
    ]
    response = await http.post(BATCH, json={"messages": messages})
    assert response.status_code == 200
    body = response.json()
    assert body["accepted"] == 1000
    assert [r["id"] for r in body["results"]] == list(range(1, 1001))
    assert await stored_rows(pool) == 1000
    # The next batch is paced by the rate: what is over it waits for Retry-After.
    response = await http.post(BATCH, json={"messages": messages})
    assert response.json()["accepted"] < 1000
    assert {r["reason"] for r in response.json()["results"] if r["status"] == "rejected"} == {
        "rate_limited"
    }


async def test_endpoints_are_documented(http: httpx.AsyncClient) -> None:
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert "/ingest/v1/tenant/{tenant_id}/device/{device_id}/telemetry" in paths
    assert "/ingest/v1/tenant/{tenant_id}/device/{device_id}/heartbeat" in paths
    assert "/ingest/v1/batch" in paths
    telemetry = paths["/ingest/v1/tenant/{tenant_id}/device/{device_id}/telemetry"]["post"]
    assert {"201", "400", "401", "404", "408", "413", "429", "503"} <= set(telemetry["responses"])
    # The device token is a security scheme, so that the docs page's "Authorize" sends it.
    assert telemetry["security"] == [{"provisionToken": []}]


async def test_metrics_are_recorded(settings: Settings, pool: asyncpg.Pool, token: str) -> None:
    from pulse.app import create_app

    app = create_app(settings)
    async with app.test_app():
        client = app.test_client()
        headers = {"X-Provision-Token": token}
        await client.post(telemetry_url(), json={"metrics": {"v": 1}}, headers=headers)
        await client.post(telemetry_url(), json={"metrics": {}}, headers=headers)
        await client.post(heartbeat_url(), headers={"X-Provision-Token": "pdt_wrong"})
        message = {"tenant_id": "t1", "device_id": "dev-1", "provision_token": token}
        await client.post(
            BATCH,
            json={"messages": [message | {"metrics": {"v": 2}}, message | {"metrics": {"v": 3}}]},
        )
        registry = app.extensions["pulse"].metrics.registry

        def value(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        assert value("pulse_ingest_rows_total", endpoint="telemetry") == 1
        assert value("pulse_ingest_rows_total", endpoint="batch") == 2
        assert value("pulse_ingest_rejected_total", reason="invalid_payload") == 1
        assert value("pulse_ingest_rejected_total", reason="invalid_device_token") == 1
        assert value("pulse_ingest_latency_seconds_count", endpoint="telemetry") == 1
        assert value("pulse_ingest_latency_seconds_count", endpoint="batch") == 1
        # No NATS or MQTT here: no gauge of their connections, whose 0 an alert on it
        # would take for an outage (they were exported as 0).
        text = await (await client.get("/metrics")).get_data(as_text=True)
        assert ("pulse_bus_connected" in text) == (settings.bus_url is not None)
        assert "pulse_mqtt_connected" not in text
        assert "pulse_listener_connected 1.0" in text
        # Every stream kind's counters are there from the start, at 0: a rate over them
        # is 0 before the first event, not "no data".
        for kind in ("sse", "websocket", "legacy_v2"):
            assert registry.get_sample_value("pulse_events_delivered_total", {"kind": kind}) == 0
            assert f'pulse_lagging_disconnects_total{{kind="{kind}"}} 0.0' in text
