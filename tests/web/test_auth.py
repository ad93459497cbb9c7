from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from quart import Quart, websocket
from quart.testing.connections import WebsocketDisconnectError
from werkzeug.datastructures import Headers

from pulse.app import create_app
from pulse.auth.principal import ADMIN_ROLES
from pulse.config import Settings
from pulse.errors import ApiError
from pulse.web.auth import (
    Credential,
    authenticate_request,
    find_credential,
    is_allowed_origin,
    request_tenant,
)
from tests.support import deeply_nested_token

BEARER = Headers({"Authorization": "Bearer from-header"})
COOKIE = {"pulse_session": "from-cookie"}
QUERY = {"token": "from-query"}


def test_the_header_comes_first() -> None:
    assert find_credential(BEARER, COOKIE, QUERY, allow_query=True) == Credential(
        "from-header", "header"
    )


def test_then_the_cookie() -> None:
    assert find_credential(Headers(), COOKIE, QUERY, allow_query=True) == Credential(
        "from-cookie", "cookie"
    )


def test_then_the_query_when_allowed() -> None:
    assert find_credential(Headers(), {}, QUERY, allow_query=True) == Credential(
        "from-query", "query"
    )


def test_the_query_is_refused_when_not_allowed() -> None:
    assert find_credential(Headers(), {}, QUERY, allow_query=False) is None


@pytest.mark.parametrize(
    "authorization", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "from-header", ""]
)
def test_a_header_that_is_no_bearer_token_is_skipped(authorization: str) -> None:
    headers = Headers({"Authorization": authorization})
    assert find_credential(headers, COOKIE, {}, allow_query=False) == Credential(
        "from-cookie", "cookie"
    )


def test_the_bearer_scheme_is_case_insensitive() -> None:
    headers = Headers({"Authorization": "bearer  tok "})
    assert find_credential(headers, {}, {}, allow_query=False) == Credential("tok", "header")


def test_empty_values_count_as_absent() -> None:
    assert (
        find_credential(Headers(), {"pulse_session": ""}, {"token": ""}, allow_query=True) is None
    )


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Quart]:
    """The real app, serving in-process, plus probes using the auth layer."""
    app = create_app(settings)

    @app.get("/probe")
    async def probe() -> dict[str, object]:
        principal = await authenticate_request(allow_query=True)
        return {"tenant": request_tenant(principal), "roles": sorted(principal.roles)}

    @app.post("/probe-admin")
    async def probe_admin() -> dict[str, object]:
        principal = await authenticate_request(roles=ADMIN_ROLES)
        return {"subject": principal.subject}

    @app.websocket("/probe-ws")
    async def probe_ws() -> None:
        try:
            principal = await authenticate_request(allow_query=True)
            tenant = request_tenant(principal)
        except ApiError as exc:
            await websocket.accept()
            await websocket.close(exc.close_code, exc.code)
            return
        await websocket.send(tenant)

    async with app.test_app():
        yield app


async def test_http_credentials(app: Quart, make_token: Callable[..., str]) -> None:
    client = app.test_client()
    token = make_token("t1")
    for kwargs in (
        {"headers": {"Authorization": f"Bearer {token}"}},
        {"headers": {"Cookie": f"pulse_session={token}"}},
        {"query_string": {"token": token}},
    ):
        response = await client.get("/probe", **kwargs)  # type: ignore[arg-type]
        assert response.status_code == 200, kwargs
        assert await response.get_json() == {"tenant": "t1", "roles": ["customer"]}


async def test_http_errors(app: Quart, make_token: Callable[..., str]) -> None:
    client = app.test_client()

    async def call(method: str, path: str, token: str | None, query: str = "") -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await client.open(path + query, method=method, headers=headers)
        return response.status_code, (await response.get_json())["error"]

    assert await call("GET", "/probe", None) == (401, "missing_token")
    assert await call("GET", "/probe", "nonsense") == (401, "invalid_token")
    # Signed, with claims deeper than joserfc's json can read: was a 500 and a traceback.
    assert await call("GET", "/probe", deeply_nested_token(5000)) == (401, "invalid_token")
    assert await call("GET", "/probe", make_token(lifetime_s=-60)) == (401, "token_expired")
    assert await call("GET", "/probe", make_token(roles=("nobody",))) == (403, "forbidden")
    assert await call("GET", "/probe", make_token(), "?tenant_id=t2") == (403, "forbidden")
    assert await call("GET", "/probe", make_token(), "?tenant_id=a%20b") == (
        400,
        "invalid_tenant_id",
    )
    # Given twice, refused: not the first taken and the other ignored.
    twice = "?tenant_id=t1&tenant_id=t2"
    assert await call("GET", "/probe", make_token(), twice) == (400, "invalid_tenant_id")
    operator = make_token(None, roles=("operator",))
    assert await call("GET", "/probe", operator) == (400, "tenant_required")
    assert await call("GET", "/probe", operator, twice) == (400, "invalid_tenant_id")
    assert await call("POST", "/probe-admin", make_token()) == (403, "forbidden")
    assert await call("POST", "/probe-admin", operator) == (403, "forbidden")
    response = await client.get("/probe")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_websocket_reads_its_own_handshake(
    app: Quart, make_token: Callable[..., str]
) -> None:
    client = app.test_client()
    async with client.websocket(f"/probe-ws?token={make_token('t7')}") as ws:
        assert await ws.receive() == "t7"
    operator = make_token(None, roles=("operator",))
    async with client.websocket(f"/probe-ws?token={operator}&tenant_id=t9") as ws:
        assert await ws.receive() == "t9"


async def test_websocket_auth_failures_close_with_contract_codes(
    app: Quart, make_token: Callable[..., str]
) -> None:
    client = app.test_client()
    operator = make_token(None, roles=("operator",))
    for query, code in (
        ("", 4001),
        (f"?token={make_token(lifetime_s=-60)}", 4001),
        (f"?token={deeply_nested_token(5000)}", 4001),
        (f"?token={make_token()}&tenant_id=t2", 4003),
        (f"?token={operator}", 4000),
    ):
        async with client.websocket("/probe-ws" + query) as ws:
            with pytest.raises(WebsocketDisconnectError) as info:
                await ws.receive()
        assert info.value.args[0] == code, query


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "expected"),
    [
        # The page's own origin, whatever the scheme a proxy terminated.
        ("http://127.0.0.1:8000", "127.0.0.1:8000", (), True),
        ("https://pulse.example", "pulse.example", (), True),
        ("https://pulse.example", "pulse.example:443", (), True),
        ("http://pulse.example", "PULSE.example:80", (), True),
        ("https://Pulse.Example/", "pulse.example", (), True),  # case, a trailing slash
        # Another site, another port, another host.
        ("https://evil.example", "pulse.example", (), False),
        ("http://127.0.0.1:9000", "127.0.0.1:8000", (), False),
        ("https://pulse.example.evil.example", "pulse.example", (), False),
        ("https://pulse.example:8443", "pulse.example", (), False),
        # Listed origins, and the wildcard.
        ("https://app.example", "pulse.example", ("https://app.example",), True),
        ("https://APP.example/", "pulse.example", ("https://app.example",), True),
        ("https://evil.example", "pulse.example", ("*",), True),
        # No origin, an opaque one, or nothing to compare with.
        (None, "pulse.example", (), False),
        ("", "pulse.example", (), False),
        ("null", "pulse.example", (), False),
        ("file://", "pulse.example", (), False),
        ("https://pulse.example", None, (), False),
        ("http://[::1", "pulse.example", (), False),
    ],
)
def test_allowed_origins_for_cookie_changes(
    origin: str | None, host: str | None, allowed: tuple[str, ...], expected: bool
) -> None:
    assert is_allowed_origin(origin, host, allowed) is expected
