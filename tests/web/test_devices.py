from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.auth.device_tokens import device_token_matches
from tests.support import provision_device

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
        ["dev-1"],
        # Unknown fields are refused, as for readings and rules: a typo is not ignored.
        {"device_id": "ok", "site": "s1"},
        {"device_id": "ok", "tenant_id": "t2"},
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
    assert response.json() == {"devices": []}


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

    assert (await http.get(DEVICES, headers=other)).json() == {"devices": []}
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
