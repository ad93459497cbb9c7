from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.auth.device_tokens import device_token_matches
from pulse.fleet.devices import Q as DEVICE_QUERIES
from tests.support import every_page, provision_device

DEVICES = "/api/v1/customer/devices"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

MakeToken = Callable[..., str]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def admin(make_token: MakeToken) -> dict[str, str]:
    return auth(make_token("t1", roles=("tenant-admin",)))


async def stored_hash(pool: asyncpg.Pool, tenant: str, device: str) -> bytes:
    value = await pool.fetchval(
        "SELECT token_hash FROM devices WHERE tenant_id = $1 AND device_id = $2", tenant, device
    )
    assert isinstance(value, bytes)
    return value


def error_of(response: httpx.Response) -> str:
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert body["detail"]
    return str(body["error"])


async def test_create_stores_only_the_hash(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    response = await http.post(
        DEVICES, json={"device_id": "dev-1", "site_id": "s1", "name": "Boiler"}, headers=admin
    )
    assert response.status_code == 201
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    token = body.pop("provision_token")
    # The device as every other answer shows it, so a client can store it as it is.
    assert body == {
        "tenant_id": "t1",
        "device_id": "dev-1",
        "site_id": "s1",
        "name": "Boiler",
        "status": "OFFLINE",
        "last_seen_at": None,
        "created_at": body["created_at"],
    }
    assert ISO_Z.match(body["created_at"])
    listed = (await http.get(DEVICES, headers=admin)).json()["devices"]
    assert listed == [body]
    stored = await stored_hash(pool, "t1", "dev-1")
    assert stored != token.encode()
    assert stored == hashlib.sha256(token.encode()).digest()
    assert await pool.fetchval("SELECT count(*) FROM tenants WHERE tenant_id = 't1'") == 1


async def test_create_in_an_existing_tenant(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    await pool.execute("INSERT INTO tenants (tenant_id, last_event_id) VALUES ('t1', 41)")
    response = await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
    assert response.status_code == 201
    # The tenant row, and with it the event id sequence, is left as it was.
    assert await pool.fetchval("SELECT last_event_id FROM tenants WHERE tenant_id = 't1'") == 41


@pytest.mark.parametrize(("field", "most"), [("name", 200), ("site_id", 64)])
async def test_a_label_too_long_is_said_in_characters(
    http: httpx.AsyncClient, admin: dict[str, str], field: str, most: int
) -> None:
    """Review 2 of 8 December: it read "at most 200 items after validation, not 201"."""
    body = {"device_id": "d1", field: "x" * (most + 1)}
    response = await http.post(DEVICES, json=body, headers=admin)
    assert response.status_code == 400
    assert response.json()["detail"] == f"{field}: String should have at most {most} characters"
    body[field] = "x" * most
    assert (await http.post(DEVICES, json=body, headers=admin)).status_code == 201


async def test_an_id_of_three_dots_is_a_device_like_any_other(
    http: httpx.AsyncClient, admin: dict[str, str]
) -> None:
    response = await http.post(DEVICES, json={"device_id": "..."}, headers=admin)
    assert response.status_code == 201, response.text
    assert (await http.get(f"{DEVICES}/...", headers=admin)).status_code == 200


async def test_duplicate_device_is_a_conflict(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    first = await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
    second = await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
    assert second.status_code == 409
    assert error_of(second) == "device_exists"
    # The first token still works: a failed create must not rotate it.
    stored = await stored_hash(pool, "t1", "dev-1")
    assert device_token_matches(first.json()["provision_token"], stored)


@pytest.mark.parametrize(
    "body",
    [
        {"device_id": "has space"},
        {"device_id": ""},
        {"device_id": "x" * 65},
        {"device_id": 42},
        {"site_id": "s1"},
        {"device_id": "ok", "name": "n" * 201},
        # PostgreSQL refuses NUL in text (it was a 500); a terminal obeys ESC.
        {"device_id": "ok", "name": "a\u0000b"},
        {"device_id": "ok", "site_id": "a\u0000b"},
        {"device_id": "ok", "name": "\u001b]0;title\u0007"},
        {"device_id": "ok", "site_id": "line\nbreak"},
        {"device_id": "ok", "name": "\u202ereversed"},
        # Invisible: "ad<U+200B>min" shows as "admin"; U+2028 breaks the line it is in.
        {"device_id": "ok", "name": "ad\u200bmin"},
        {"device_id": "ok", "name": "a\u2028b"},
        {"device_id": "ok", "site_id": "a\u2029b"},
        {"device_id": "ok", "site_id": "\ufeffsite"},
        ["dev-1"],
        # Unknown fields are refused, as for readings and rules: a typo is not ignored.
        {"device_id": "ok", "site": "s1"},
        {"device_id": "ok", "tenant_id": "t2"},
        # Dot segments: a URL cannot carry them (a device created so could post nothing
        # and be neither deleted nor given a new token). "..." is an id like any other.
        {"device_id": "."},
        {"device_id": ".."},
    ],
)
async def test_invalid_payload(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str], body: Any
) -> None:
    response = await http.post(DEVICES, json=body, headers=admin)
    assert response.status_code == 400
    assert error_of(response) == "invalid_payload"
    assert await pool.fetchval("SELECT count(*) FROM devices") == 0


async def test_list(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str], make_token: MakeToken
) -> None:
    for device, site in (("dev-b", None), ("dev-a", "s1")):
        body = {"device_id": device, **({"site_id": site} if site else {})}
        assert (await http.post(DEVICES, json=body, headers=admin)).status_code == 201
    # Seen just now (the status sweeper would rightly call an older time OFFLINE),
    # at half a second past a whole second.
    seen = await pool.fetchval(
        "UPDATE devices SET status = 'ONLINE', "
        "last_seen_at = date_trunc('second', now()) + interval '0.5 s' "
        "WHERE device_id = 'dev-a' RETURNING last_seen_at"
    )
    # Any role may list.
    response = await http.get(DEVICES, headers=auth(make_token("t1", roles=("customer",))))
    assert response.status_code == 200
    devices = response.json()["devices"]
    assert [d["device_id"] for d in devices] == ["dev-a", "dev-b"]
    a, b = devices
    assert set(a) == {
        "tenant_id",
        "device_id",
        "site_id",
        "name",
        "status",
        "last_seen_at",
        "created_at",
    }
    assert a["tenant_id"] == b["tenant_id"] == "t1"
    assert a["status"] == "ONLINE"
    assert a["last_seen_at"] == seen.strftime("%Y-%m-%dT%H:%M:%S.500Z")
    assert a["site_id"] == "s1"
    assert b == {**b, "status": "OFFLINE", "last_seen_at": None, "site_id": None, "name": None}
    assert ISO_Z.match(b["created_at"])


async def test_list_of_an_unknown_tenant_is_empty(
    http: httpx.AsyncClient, make_token: MakeToken
) -> None:
    response = await http.get(DEVICES, headers=auth(make_token("nobody-here")))
    assert response.status_code == 200
    assert response.json() == {"devices": [], "next_cursor": None}


async def test_delete(http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]) -> None:
    await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
    response = await http.delete(f"{DEVICES}/dev-1", headers=admin)
    assert response.status_code == 204
    assert response.content == b""
    assert await pool.fetchval("SELECT count(*) FROM devices") == 0
    again = await http.delete(f"{DEVICES}/dev-1", headers=admin)
    assert again.status_code == 404
    assert error_of(again) == "unknown_device"


async def test_rotate_token_revokes_the_old_one(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    created = await http.post(DEVICES, json={"device_id": "dev-1"}, headers=admin)
    old = created.json()["provision_token"]
    response = await http.post(f"{DEVICES}/dev-1/rotate-token", headers=admin)
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    new = body.pop("provision_token")
    # The device, as the list shows it.
    assert [body] == (await http.get(DEVICES, headers=admin)).json()["devices"]
    assert (body["tenant_id"], body["device_id"]) == ("t1", "dev-1")
    assert new != old
    stored = await stored_hash(pool, "t1", "dev-1")
    assert device_token_matches(new, stored)
    assert not device_token_matches(old, stored)


async def test_get_one_device(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str], make_token: MakeToken
) -> None:
    created = await http.post(DEVICES, json={"device_id": "dev-1", "name": "Boiler"}, headers=admin)
    await http.post(DEVICES, json={"device_id": "dev-2"}, headers=admin)
    await pool.execute(
        "UPDATE devices SET status = 'ONLINE', last_seen_at = now() WHERE device_id = 'dev-1'"
    )
    # Any role may read it, and it is the device as the list shows it.
    reader = auth(make_token("t1", roles=("customer",)))
    response = await http.get(f"{DEVICES}/dev-1", headers=reader)
    assert response.status_code == 200
    device = response.json()
    listed = (await http.get(DEVICES, headers=reader)).json()["devices"]
    assert device == listed[0]
    assert device["tenant_id"] == "t1"
    assert device["name"] == "Boiler"
    assert device["status"] == "ONLINE"
    assert ISO_Z.match(device["last_seen_at"])
    assert device["created_at"] == created.json()["created_at"]
    # Operators name the tenant.
    operator = auth(make_token(None, roles=("operator",)))
    assert (await http.get(f"{DEVICES}/dev-2?tenant_id=t1", headers=operator)).json() == listed[1]


@pytest.mark.parametrize("device", ["ghost", "has space", "x" * 65])
async def test_get_unknown_device(
    http: httpx.AsyncClient, admin: dict[str, str], device: str
) -> None:
    response = await http.get(f"{DEVICES}/{device}", headers=admin)
    assert response.status_code == 404
    assert error_of(response) == "unknown_device"


async def test_rotate_unknown_device(http: httpx.AsyncClient, admin: dict[str, str]) -> None:
    response = await http.post(f"{DEVICES}/ghost/rotate-token", headers=admin)
    assert response.status_code == 404
    assert error_of(response) == "unknown_device"


@pytest.mark.parametrize("device", ["a%00b", "%C3%A9", "x" * 65])
async def test_an_id_no_device_can_have_is_unknown(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str], device: str
) -> None:
    await provision_device(pool, "t1", "dev-1")
    for method, path in (("DELETE", device), ("POST", f"{device}/rotate-token")):
        response = await http.request(method, f"{DEVICES}/{path}", headers=admin)
        assert response.status_code == 404, response.text
        assert error_of(response) == "unknown_device"
    assert await pool.fetchval("SELECT count(*) FROM devices") == 1


@pytest.mark.parametrize("role", ["customer", "operator"])
async def test_readers_cannot_write(
    http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: MakeToken, role: str
) -> None:
    tenant = None if role == "operator" else "t1"
    headers = auth(make_token(tenant, roles=(role,)))
    await provision_device(pool, "t1", "dev-2")
    query = "?tenant_id=t1"
    for method, path, body in (
        ("POST", DEVICES, {"device_id": "dev-1"}),
        # A reader is told 403 before anything about its body.
        ("POST", DEVICES, {"device_id": "not valid"}),
        ("DELETE", f"{DEVICES}/dev-2", None),
        ("POST", f"{DEVICES}/dev-2/rotate-token", None),
    ):
        response = await http.request(method, path + query, json=body, headers=headers)
        assert response.status_code == 403, (method, path)
        assert error_of(response) == "forbidden"
    assert await pool.fetchval("SELECT array_agg(device_id) FROM devices") == ["dev-2"]


async def test_missing_token(http: httpx.AsyncClient) -> None:
    for method, path in (("GET", DEVICES), ("POST", DEVICES), ("DELETE", f"{DEVICES}/d")):
        response = await http.request(method, path, json={"device_id": "dev-1"})
        assert response.status_code == 401
        assert error_of(response) == "missing_token"


async def test_tokens_that_cannot_be_stored_are_invalid(
    http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: MakeToken
) -> None:
    """An exp beyond the year 9999, a sub with NUL: 401, never a 500, on every route
    that takes a token (the stream ticket stores the subject)."""
    await provision_device(pool, "t1", "dev-1")
    admin = ("tenant-admin",)
    for token in (
        make_token("t1", roles=admin, exp=10**20),
        make_token("t1", roles=admin, subject="a\x00b"),
    ):
        for method, path in (
            ("GET", DEVICES),
            ("POST", f"{DEVICES}/dev-1/rotate-token"),
            ("POST", "/api/v1/stream-ticket"),
        ):
            response = await http.request(method, path, headers=auth(token))
            assert response.status_code == 401, (method, path, response.text)
            assert error_of(response) == "invalid_token"


async def test_expired_token(http: httpx.AsyncClient, make_token: MakeToken) -> None:
    token = make_token("t1", roles=("tenant-admin",), lifetime_s=-120)
    response = await http.get(DEVICES, headers=auth(token))
    assert response.status_code == 401
    assert error_of(response) == "token_expired"


async def test_session_cookie_works(http: httpx.AsyncClient, make_token: MakeToken) -> None:
    http.cookies.set("pulse_session", make_token("t1"))
    response = await http.get(DEVICES)
    assert response.status_code == 200


async def test_tenant_isolation(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str], make_token: MakeToken
) -> None:
    created = await http.post(DEVICES, json={"device_id": "dev-a1"}, headers=admin)
    token_a = created.json()["provision_token"]
    other = auth(make_token("t2", roles=("tenant-admin",)))

    assert (await http.get(DEVICES, headers=other)).json() == {"devices": [], "next_cursor": None}
    for method, path in (
        ("GET", f"{DEVICES}/dev-a1"),
        ("DELETE", f"{DEVICES}/dev-a1"),
        ("POST", f"{DEVICES}/dev-a1/rotate-token"),
    ):
        response = await http.request(method, path, headers=other)
        missing = await http.request(method, path.replace("dev-a1", "dev-zz"), headers=other)
        # Exactly like a device that does not exist: nothing tells the two apart.
        assert response.status_code == missing.status_code == 404, method
        assert response.json() == {
            **missing.json(),
            "detail": missing.json()["detail"].replace("dev-zz", "dev-a1"),
        }
        assert error_of(response) == "unknown_device"
    # Naming tenant A explicitly does not help either.
    response = await http.get(f"{DEVICES}?tenant_id=t1", headers=other)
    assert response.status_code == 403

    # Tenant B may use the same device id for a device of its own.
    assert (
        await http.post(DEVICES, json={"device_id": "dev-a1"}, headers=other)
    ).status_code == 201
    assert device_token_matches(token_a, await stored_hash(pool, "t1", "dev-a1"))
    listed = (await http.get(DEVICES, headers=admin)).json()["devices"]
    assert [d["device_id"] for d in listed] == ["dev-a1"]


async def test_operator_admin_names_the_tenant(
    http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: MakeToken
) -> None:
    headers = auth(make_token(None, roles=("operator-admin",)))
    created = await http.post(f"{DEVICES}?tenant_id=t9", json={"device_id": "d1"}, headers=headers)
    assert created.status_code == 201
    assert await pool.fetchval("SELECT tenant_id FROM devices WHERE device_id = 'd1'") == "t9"
    listed = await http.get(f"{DEVICES}?tenant_id=t9", headers=headers)
    assert [d["device_id"] for d in listed.json()["devices"]] == ["d1"]
    rotated = await http.post(f"{DEVICES}/d1/rotate-token?tenant_id=t9", headers=headers)
    assert rotated.status_code == 200
    assert (await http.delete(f"{DEVICES}/d1?tenant_id=t9", headers=headers)).status_code == 204


async def test_operator_with_tenant_admin_changes_no_tenant(
    http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: MakeToken
) -> None:
    """From the security audit (HIGH): roles are a union, and a token with operator
    (which may name any tenant) and tenant-admin (of its own tenant) rotated another
    tenant's device token (200, with the new token), closed its alerts and made its
    rules. A token with an operator role is an operator's, with no tenant of its own:
    it may read any tenant, and change none without operator-admin."""
    await provision_device(pool, "t2", "d2")
    mixed = auth(make_token("t1", roles=("operator", "tenant-admin")))
    rotated = await http.post(f"{DEVICES}/d2/rotate-token?tenant_id=t2", headers=mixed)
    assert rotated.status_code == 403, rotated.text
    assert "provision_token" not in rotated.text
    made = await http.post(f"{DEVICES}?tenant_id=t2", json={"device_id": "x"}, headers=mixed)
    assert made.status_code == 403
    rule = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 30, "severity": 4}
    ruled = await http.post("/api/v1/customer/alert-rules?tenant_id=t2", json=rule, headers=mixed)
    assert ruled.status_code == 403
    assert (await http.delete(f"{DEVICES}/d2?tenant_id=t2", headers=mixed)).status_code == 403
    assert await pool.fetchval("SELECT count(*) FROM devices WHERE tenant_id = 't2'") == 1
    listed = await http.get(f"{DEVICES}?tenant_id=t2", headers=mixed)
    assert [d["device_id"] for d in listed.json()["devices"]] == ["d2"]
    own = await http.post(f"{DEVICES}?tenant_id=t1", json={"device_id": "mine"}, headers=mixed)
    assert own.status_code == 403, own.text


async def test_operator_reads_any_tenant(
    http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: MakeToken
) -> None:
    await provision_device(pool, "t3", "d3")
    headers = auth(make_token(None, roles=("operator",)))
    listed = await http.get(f"{DEVICES}?tenant_id=t3", headers=headers)
    assert [d["device_id"] for d in listed.json()["devices"]] == ["d3"]


@pytest.mark.parametrize("role", ["operator", "operator-admin"])
async def test_operator_without_tenant_id(
    http: httpx.AsyncClient, make_token: MakeToken, role: str
) -> None:
    headers = auth(make_token(None, roles=(role,)))
    response = await http.get(DEVICES, headers=headers)
    assert response.status_code == 400
    assert error_of(response) == "tenant_required"


async def test_routes_are_in_the_openapi_document(http: httpx.AsyncClient) -> None:
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"post", "get"} <= set(paths[DEVICES])
    assert {"get", "delete"} <= set(paths[DEVICES + "/{device_id}"])
    assert "post" in paths[DEVICES + "/{device_id}/rotate-token"]


async def test_bodies_outside_ingest_are_at_most_64_kib(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    # Quart holds a body while the token is checked, outside the ingest buffer: every
    # route but ingest takes at most 64 KiB (a device or a rule is well under 1 KiB).
    device = b'{"device_id": "big", "name": "' + b"x" * (100 * 1024) + b'"}'
    json_admin = {**admin, "Content-Type": "application/json"}

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: cut as it arrives
        yield device

    for url in (DEVICES, "/api/v1/customer/alert-rules"):
        for content in (device, chunked()):
            response = await http.post(url, content=content, headers=json_admin)
            assert response.status_code == 413, response.text
            assert error_of(response) == "payload_too_large"
    assert await pool.fetchval("SELECT count(*) FROM devices WHERE device_id = 'big'") == 0
    fits = await http.post(DEVICES, json={"device_id": "d-64", "name": "x" * 60}, headers=admin)
    assert fits.status_code == 201, fits.text
    # Ingest still takes 1 MiB, also through Quart (a chunked body).
    token = fits.json()["provision_token"]
    head = b'{"metrics": {"v": 1}}'

    async def reading() -> AsyncIterator[bytes]:
        yield head
        yield b" " * (1024 * 1024 - len(head))

    posted = await http.post(
        "/ingest/v1/tenant/t1/device/d-64/telemetry",
        content=reading(),
        headers={"X-Provision-Token": token},
    )
    assert posted.status_code == 201, posted.text


# -- the list, a page at a time --------------------------------------------------


async def add_devices(pool: asyncpg.Pool, tenant: str, *device_ids: str) -> None:
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant)
    await pool.executemany(
        "INSERT INTO devices (tenant_id, device_id, token_hash) VALUES ($1, $2, '\\x00')",
        [(tenant, device_id) for device_id in device_ids],
    )


async def table_order(pool: asyncpg.Pool, tenant: str) -> list[str]:
    """The tenant's device ids as PostgreSQL orders them (its collation decides)."""
    rows = await pool.fetch(
        "SELECT device_id FROM devices WHERE tenant_id = $1 ORDER BY device_id", tenant
    )
    return [row["device_id"] for row in rows]


async def device_pages(
    http: httpx.AsyncClient, headers: dict[str, str], **params: str
) -> list[list[str]]:
    """The device ids of each page, following next_cursor to the end."""
    return await every_page(http, DEVICES, "devices", "device_id", headers, **params)


async def test_pages_cover_every_device_once_in_order(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    # Ids that sort differently by case, punctuation and length: the order is the table's.
    ids = [f"dev-{i}" for i in range(20)] + ["A", "b", "B.2", "x:y", "_z", "dev_1", "dev-1-a"]
    await add_devices(pool, "t1", *ids)
    pages = await device_pages(http, admin, limit="6")
    assert [len(page) for page in pages] == [6, 6, 6, 6, 3]
    assert [d for page in pages for d in page] == await table_order(pool, "t1")
    # Without a limit, a tenant of fewer than 1,000 devices gets them all in one answer.
    assert await device_pages(http, admin) == [await table_order(pool, "t1")]
    # A page that ends exactly at the last device says so.
    assert await device_pages(http, admin, limit=str(len(ids))) == [await table_order(pool, "t1")]


async def test_devices_added_or_deleted_between_pages_do_not_shift_later_pages(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    await add_devices(pool, "t1", *(f"dev-{i:02}" for i in range(10)))
    first = (await http.get(DEVICES, params={"limit": "4"}, headers=admin)).json()
    assert [d["device_id"] for d in first["devices"]] == ["dev-00", "dev-01", "dev-02", "dev-03"]
    assert first["next_cursor"] == "dev-03"
    # Before the cursor: seen by the next walk, not by this one (with OFFSET, the next
    # page would have started one device early and repeated dev-03). After it: next.
    await add_devices(pool, "t1", "dev-015", "dev-000", "dev-035")
    assert (await http.delete(f"{DEVICES}/dev-01", headers=admin)).status_code == 204
    rest = await device_pages(http, admin, limit="4", cursor=first["next_cursor"])
    assert rest == [["dev-035", "dev-04", "dev-05", "dev-06"], ["dev-07", "dev-08", "dev-09"]]
    # The cursor's own device may be gone: the page starts after where it was.
    assert (await http.delete(f"{DEVICES}/dev-03", headers=admin)).status_code == 204
    again = await device_pages(http, admin, limit="4", cursor="dev-03")
    assert again[0][0] == "dev-035"


async def test_no_limit_is_a_page_of_1000_and_limits_are_bounded(
    http: httpx.AsyncClient, pool: asyncpg.Pool, admin: dict[str, str]
) -> None:
    await add_devices(pool, "t1", *(f"dev-{i:04}" for i in range(1001)))
    first = (await http.get(DEVICES, headers=admin)).json()
    assert len(first["devices"]) == 1000 and first["next_cursor"] == "dev-0999"
    last = (await http.get(DEVICES, params={"cursor": "dev-0999"}, headers=admin)).json()
    assert last == {"devices": [last["devices"][0]], "next_cursor": None}
    assert last["devices"][0]["device_id"] == "dev-1000"
    assert (
        len((await http.get(DEVICES, params={"limit": "1000"}, headers=admin)).json()["devices"])
        == 1000
    )
    bad = [
        {"limit": "1001"},
        {"limit": "0"},
        {"limit": "-1"},
        {"limit": "ten"},
        {"limit": "1.5"},
        {"limit": "9" * 40},
        {"cursor": "has space"},
        {"cursor": "x" * 65},
        {"cursor": "a\u0000b"},
        {"cursor": "dév"},
        {"offset": "10"},
        {"page": "2"},
    ]
    for params in bad:
        response = await http.get(DEVICES, params=params, headers=admin)
        assert response.status_code == 400, params
        assert error_of(response) == "invalid_parameter", params


async def test_a_cursor_never_reaches_another_tenants_devices(
    http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: MakeToken
) -> None:
    # Interleaved ids: t2's pages, whatever the cursor, hold t2's devices only.
    await add_devices(pool, "t1", "a-1", "b-1", "c-1", "d-1")
    await add_devices(pool, "t2", "a-2", "b-2", "c-2")
    t2 = auth(make_token("t2", roles=("customer",)))
    assert await device_pages(http, t2, limit="1") == [["a-2"], ["b-2"], ["c-2"]]
    # A cursor naming t1's device (guessed, or a page of t1's) only positions t2's list.
    assert await device_pages(http, t2, cursor="a-1") == [["a-2", "b-2", "c-2"]]
    assert await device_pages(http, t2, limit="2", cursor="b-1") == [["b-2", "c-2"]]
    assert await device_pages(http, t2, cursor="d-1") == [[]]
    operator = auth(make_token(None, roles=("operator",)))
    assert await device_pages(http, operator, tenant_id="t1", limit="3", cursor="a-2") == [
        ["b-1", "c-1", "d-1"]
    ]
    # Naming another tenant is refused, cursor or not.
    response = await http.get(DEVICES, params={"tenant_id": "t1", "cursor": "a-1"}, headers=t2)
    assert response.status_code == 403


async def test_a_page_is_one_range_of_the_primary_key(pool: asyncpg.Pool) -> None:
    """Whatever the page, PostgreSQL reads its rows only, in order: no sort, no OFFSET,
    and the cursor a bound of the index scan (not a filter over the tenant's devices
    from the first), also in the generic plan a prepared statement gets after a few
    runs."""
    await add_devices(pool, "t1", *(f"dev-{i:05}" for i in range(20000)))
    await pool.execute("ANALYZE devices")
    async with pool.acquire() as conn:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        query = DEVICE_QUERIES["list_devices"].rstrip(";")
        await conn.execute(f"PREPARE page (text, text, bigint) AS {query}")
        plan = await conn.fetchval("EXPLAIN (FORMAT JSON) EXECUTE page ('t1', 'dev-1999', 1001)")
        await conn.execute("DEALLOCATE page; RESET plan_cache_mode")
    nodes = list(plan_nodes(plan[0]["Plan"]))
    assert "Sort" not in {node["Node Type"] for node in nodes}, nodes
    [scan] = [node for node in nodes if node.get("Relation Name") == "devices"]
    assert scan["Node Type"] in ("Index Scan", "Index Only Scan"), scan
    assert "device_id >" in scan["Index Cond"], scan


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)
