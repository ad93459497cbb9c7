"""One-time stream tickets (CONTRACT section 7) on both WebSockets and SSE."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

import asyncpg
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from pulse.config import Settings
from tests.streams.sse_client import SSE_PATH
from tests.streams.ws_support import V2_PATH, WS_PATH, close_of, open_ws, recv, request
from tests.support import running_server, until

pytestmark = pytest.mark.timeout(60)

TICKET_PATH = "/api/v1/stream-ticket"


async def new_ticket(http: httpx.AsyncClient, token: str) -> str:
    r = await http.post(TICKET_PATH, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"ticket", "expires_in"} and 0 <= body["expires_in"] <= 30
    assert r.headers["cache-control"] == "no-store"
    return str(body["ticket"])


async def test_a_ticket_works_once_on_every_stream(
    server: str, http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    token = make_token("t1", lifetime_s=600)
    r = await http.post(TICKET_PATH, headers={"Authorization": f"Bearer {token}"})
    assert r.json()["expires_in"] == 30  # the token lives longer
    ticket = r.json()["ticket"]
    row = await pool.fetchrow(
        "SELECT *, extract(epoch FROM expires_at - clock_timestamp()) AS ttl FROM stream_tickets"
    )
    assert row["ticket_hash"] != ticket.encode() and len(row["ticket_hash"]) == 32
    assert ticket not in repr(dict(row))
    assert 28 < row["ttl"] <= 30 and row["tenant_id"] == "t1" and row["roles"] == ["customer"]

    async with open_ws(server, WS_PATH, ticket=ticket) as ws:
        connected = await recv(ws)
        assert connected["type"] == "connected" and connected["tenant_id"] == "t1"
        # The connection lives as long as the token the ticket stands for.
        reply = await request(ws, {"action": "auth", "token": token})
        assert reply["type"] == "auth_ok"
    assert await close_of(server, WS_PATH, ticket=ticket) == (4001, "invalid_ticket")

    ticket = await new_ticket(http, token)
    async with open_ws(server, V2_PATH, ticket=ticket) as ws:
        reply = await request(ws, {"action": "subscribe", "type": "device", "device_id": "d1"})
        assert reply == {"type": "subscribed", "channel": "device", "device_id": "d1"}
    assert await close_of(server, V2_PATH, ticket=ticket) == (4001, "invalid_ticket")

    ticket = await new_ticket(http, token)
    async with http.stream("GET", SSE_PATH, params={"ticket": ticket}) as r:
        assert r.status_code == 200
    r = await http.get(SSE_PATH, params={"ticket": ticket})
    assert r.status_code == 401 and r.json()["error"] == "invalid_ticket"
    assert await pool.fetchval("SELECT count(*) FROM stream_tickets") == 0


async def test_a_ticket_expires_and_keeps_its_identity(
    server: str,
    http: httpx.AsyncClient,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("pulse.auth.tickets.TICKET_TTL_S", 1)
    r = await http.post(TICKET_PATH, headers={"Authorization": f"Bearer {make_token('t1')}"})
    stale = r.json()["ticket"]
    await asyncio.sleep(1.2)
    assert await close_of(server, WS_PATH, ticket=stale) == (4001, "invalid_ticket")
    monkeypatch.undo()

    # A ticket never outlives its token; an operator's ticket still needs tenant_id.
    # (4 s: a token's exp is a whole second, so it has 3-4 s left, room for a slow
    # machine to issue the ticket and open the socket before it ends.)
    short = make_token("t1", lifetime_s=4)
    r = await http.post(TICKET_PATH, headers={"Authorization": f"Bearer {short}"})
    assert r.status_code == 200 and r.json()["expires_in"] <= 4  # not the 30 s it cannot live
    ticket = r.json()["ticket"]
    assert (
        0
        < await pool.fetchval(
            "SELECT extract(epoch FROM expires_at - clock_timestamp()) FROM stream_tickets"
        )
        <= 4
    )
    started = time.monotonic()
    async with open_ws(server, WS_PATH, ticket=ticket) as ws:
        await recv(ws)
        code = None
        while code is None:
            try:
                await recv(ws)
            except Exception:
                code = ws.close_code, ws.close_reason
    assert code == (4001, "token_expired") and time.monotonic() - started < 6

    operator = make_token(None, roles=("operator",))
    assert await close_of(server, WS_PATH, ticket=await new_ticket(http, operator)) == (
        4000,
        "tenant_required",
    )
    ticket = await new_ticket(http, operator)
    async with open_ws(server, WS_PATH, ticket=ticket, tenant_id="t9") as ws:
        assert (await recv(ws))["tenant_id"] == "t9"


async def test_a_ticket_whose_token_has_expired_opens_no_stream_and_stays_unspent(
    server: str, http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """The review: the SSE fast path redeemed a ticket without asking whether its token
    had expired (Quart's route does): a stream opened, to end at once, and the ticket was
    spent. A ticket never outlives its token, so this is a race at its last second; here
    the row is made to outlive it."""
    ticket = await new_ticket(http, make_token("t1", lifetime_s=2))
    exp = await pool.fetchval("SELECT expires_at FROM stream_tickets")
    await pool.execute(
        "UPDATE stream_tickets SET expires_at = clock_timestamp() + interval '1 min'"
    )
    await until(lambda: time.time() > exp.timestamp() + 0.1, timeout=10)  # the token's exp
    r = await http.get(SSE_PATH, params={"ticket": ticket})
    assert r.status_code == 401 and r.json()["error"] == "token_expired", r.text
    assert await pool.fetchval("SELECT count(*) FROM stream_tickets") == 1  # unspent


async def test_a_token_past_its_exp_opens_no_stream_and_buys_no_ticket(
    server: str, http: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    """Within the verifier's 30 s leeway a token past its exp still serves a single
    request; a stream opened with it would end at once (an EventSource, reconnecting
    every 3 s with the same token, never learnt why), so streams and tickets refuse it."""
    late = make_token("t1", lifetime_s=-10)
    bearer = {"Authorization": f"Bearer {late}"}
    assert (await http.get("/api/v1/customer/devices", headers=bearer)).status_code == 200
    r = await http.get(SSE_PATH, headers=bearer)
    assert r.status_code == 401 and r.json()["error"] == "token_expired", r.text
    r = await http.get(SSE_PATH, params={"token": late})
    assert r.status_code == 401 and r.json()["error"] == "token_expired", r.text
    r = await http.post(TICKET_PATH, headers=bearer)
    assert r.status_code == 401 and r.json()["error"] == "token_expired", r.text
    for path in (WS_PATH, V2_PATH):
        async with open_ws(server, path, token=late) as ws:
            # Closed before it is admitted: no "connected" first.
            with pytest.raises(ConnectionClosed):
                message = await asyncio.wait_for(ws.recv(), 10)
                pytest.fail(f"{path} sent {message!r}")
            assert (ws.close_code, ws.close_reason) == (4001, "token_expired")


async def test_issuing_a_ticket_needs_a_token_in_a_header_or_cookie(
    http: httpx.AsyncClient, make_token: Callable[..., str]
) -> None:
    r = await http.post(TICKET_PATH)
    assert r.status_code == 401 and r.json()["error"] == "missing_token"
    r = await http.post(TICKET_PATH, params={"token": make_token("t1")})
    assert r.status_code == 401
    r = await http.post(
        TICKET_PATH, headers={"Authorization": f"Bearer {make_token('t1', roles=())}"}
    )
    assert r.status_code == 403
    http.cookies.set("pulse_session", make_token("t1"))
    # With the cookie, from a page of this server (tests/web/test_csrf.py).
    r = await http.post(TICKET_PATH)
    assert r.status_code == 403 and r.json()["error"] == "origin_not_allowed"
    r = await http.post(TICKET_PATH, headers={"Origin": str(http.base_url).rstrip("/")})
    assert r.status_code == 200 and r.json()["ticket"].startswith("pst_")
    # A ticket is not a token: it cannot buy another ticket.
    http.cookies.clear()
    r = await http.post(TICKET_PATH, headers={"Authorization": f"Bearer {r.json()['ticket']}"})
    assert r.status_code == 401


async def test_a_request_refused_for_its_parameters_or_tenant_does_not_spend_its_ticket(
    server: str, http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """Issue #19 item 3: the corrected request still opens the stream with the same ticket."""
    ticket = await new_ticket(http, make_token("t1"))
    r = await http.get(SSE_PATH, params={"ticket": ticket, "last_event_id": "x"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_parameter"
    assert await close_of(server, WS_PATH, ticket=ticket, metric="no spaces") == (
        4000,
        "invalid_parameter",
    )
    r = await http.get(SSE_PATH, params={"ticket": ticket, "tenant_id": "t2"})
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    async with open_ws(server, WS_PATH, ticket=ticket) as ws:
        assert (await recv(ws))["type"] == "connected"
    assert await pool.fetchval("SELECT count(*) FROM stream_tickets") == 0

    operator = await new_ticket(http, make_token(None, roles=("operator",)))
    r = await http.get(SSE_PATH, params={"ticket": operator})
    assert r.status_code == 400 and r.json()["error"] == "tenant_required"
    async with http.stream("GET", SSE_PATH, params={"ticket": operator, "tenant_id": "t9"}) as r:
        assert r.status_code == 200
    r = await http.get(SSE_PATH, params={"ticket": operator, "tenant_id": "t9"})
    assert r.status_code == 401 and r.json()["error"] == "invalid_ticket"


@pytest.fixture
def few_tickets(settings: Settings) -> Settings:
    """A burst of 5 tickets per principal, then next to none while the test runs (the
    refill of one a second would make the count depend on the machine's speed)."""
    return dataclasses.replace(settings, ticket_rate_per_s=0.001, ticket_burst=5)


async def test_tickets_are_rate_limited_per_principal(
    few_tickets: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """A burst, then about ticket_rate_per_s, for each tenant and subject: every ticket
    is a row (a probe issued 2,000 in 8 s)."""
    alice = make_token("t1", subject="alice")
    async with running_server(few_tickets) as url, httpx.AsyncClient(base_url=url) as http:
        for _ in range(few_tickets.ticket_burst):
            await new_ticket(http, alice)
        r = await http.post(TICKET_PATH, headers={"Authorization": f"Bearer {alice}"})
        assert r.status_code == 429, r.text
        assert r.json()["error"] == "rate_limited"
        # The wait for the next ticket: 1 / ticket_rate_per_s, in whole seconds.
        assert 990 <= int(r.headers["Retry-After"]) <= 1000
        # Another token of the same principal shares the limit; other principals do not.
        r = await http.post(
            TICKET_PATH,
            headers={"Authorization": f"Bearer {make_token('t1', subject='alice', lifetime_s=60)}"},
        )
        assert r.status_code == 429
        await new_ticket(http, make_token("t1", subject="bob"))
        await new_ticket(http, make_token("t2", subject="alice"))
    assert (
        await pool.fetchval("SELECT count(*) FROM stream_tickets") == few_tickets.ticket_burst + 2
    )
