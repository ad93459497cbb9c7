"""The SSE fast path (pulse.web.sse_fastpath) against Quart's route, over a real socket.

A stream opened with a token or a ticket is served before Quart; a refusal made
before a ticket is spent goes through Quart. Both doors must answer alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from pulse.auth.tickets import Q as TICKET_QUERIES
from pulse.config import Settings
from pulse.db.database import Database
from pulse.web.sse_fastpath import SseFastPath
from tests.streams.sse_client import SSE_PATH
from tests.support import insert_readings, running_server
from tests.web.test_sse import read_body
from tests.web.test_tickets import new_ticket

pytestmark = pytest.mark.timeout(60)

STATUS_PATH = "/api/v1/telemetry/stream/status"


async def sse_connections(http: httpx.AsyncClient, count: int) -> None:
    """Wait until the status endpoint counts ``count`` SSE connections."""
    async with asyncio.timeout(10):
        while (await http.get(STATUS_PATH)).json()["connections"]["sse"] != count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def _opening(http: httpx.AsyncClient, **kwargs: object) -> tuple[dict[str, str], bytes]:
    """The headers (but the date) and the body up to the second event of a stream from 0."""
    async with http.stream("GET", SSE_PATH, **kwargs) as r:  # type: ignore[arg-type]
        assert r.status_code == 200, await r.aread()
        body = await read_body(r, b'"hum": 40}}}\n\n')
        return {k: v for k, v in r.headers.items() if k != "date"}, body


def only_quart(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on every SSE request goes to Quart's route: the other door."""

    def to_quart(self: SseFastPath, scope: object, receive: object, send: object) -> object:
        return self._inner(scope, receive, send)

    monkeypatch.setattr(SseFastPath, "_serve", to_quart)


async def test_streams_skip_quart_and_answer_as_it_does(
    server: str,
    http: httpx.AsyncClient,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    quart_requests: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await insert_readings(pool, "t1", [("d1", {"temp": 21.5}), ("d2", {"hum": 40})])
    token = make_token("t1")
    from_zero = {"Last-Event-ID": "0"}
    fast = [
        await _opening(http, headers={"Authorization": f"Bearer {token}", **from_zero}),
        await _opening(http, headers=from_zero, cookies={"pulse_session": token}),
        await _opening(http, params={"token": token, "last_event_id": "0"}),
        await _opening(http, params={"ticket": await new_ticket(http, token)}, headers=from_zero),
    ]
    assert SSE_PATH not in quart_requests

    only_quart(monkeypatch)
    through_quart = [
        await _opening(http, headers={"Authorization": f"Bearer {token}", **from_zero}),
        await _opening(http, params={"ticket": await new_ticket(http, token)}, headers=from_zero),
    ]
    assert quart_requests.count(SSE_PATH) == 2
    assert through_quart[0][1].startswith(b"retry: 2000\n\nid: 1\ndata: ")
    for answer in fast:
        assert answer == through_quart[0] == through_quart[1]


@pytest.mark.parametrize(
    ("params", "headers", "status"),
    [
        ({"device_id": "bad name!"}, {}, 400),
        ({}, {"Last-Event-ID": "-1"}, 400),
        ({"token": "not-a-jwt"}, {}, 401),
        ({}, {}, 401),
        ({"tenant_id": "t2"}, {"Authorization": "Bearer {token}"}, 403),
    ],
    ids=["bad filter", "bad position", "bad token", "no token", "another tenant"],
)
async def test_refusals_are_quarts(
    http: httpx.AsyncClient,
    make_token: Callable[..., str],
    quart_requests: list[str],
    params: dict[str, str],
    headers: dict[str, str],
    status: int,
) -> None:
    token = make_token("t1")
    headers = {k: v.format(token=token) for k, v in headers.items()}
    if status != 401 and "Authorization" not in headers:
        params = {**params, "token": token}
    r = await http.get(SSE_PATH, params=params, headers=headers)
    assert r.status_code == status, r.text
    assert set(r.json()) >= {"error", "detail"}  # the API's error body, by Quart's handlers
    assert quart_requests.count(SSE_PATH) == 1


@pytest.mark.parametrize(
    "ticket",
    ["pst_" + secrets.token_urlsafe(32), "pst_never-issued", "x" * 47],
    ids=["well-shaped", "malformed", "no prefix"],
)
async def test_an_invalid_ticket_is_refused_once_by_the_fast_path_as_quart_words_it(
    http: httpx.AsyncClient,
    quart_requests: list[str],
    monkeypatch: pytest.MonkeyPatch,
    ticket: str,
) -> None:
    """A made-up ticket was looked up by the fast path, then again by Quart: two write
    transactions per request for anyone (security audit, L1). Now at most one lookup
    (none for a ticket of the wrong shape), and the fast path's answer is Quart's."""
    lookups: list[str] = []
    fetch = Database.fetch

    async def counted(self: Database, query: str, *args: Any) -> Any:
        if query == TICKET_QUERIES["take_tickets"]:
            lookups.append(query)
        return await fetch(self, query, *args)

    monkeypatch.setattr(Database, "fetch", counted)

    def answer(r: httpx.Response) -> tuple[int, dict[str, str], bytes]:
        return r.status_code, {k: v for k, v in r.headers.items() if k != "date"}, r.content

    fast = answer(await http.get(SSE_PATH, params={"ticket": ticket}))
    assert SSE_PATH not in quart_requests
    assert len(lookups) == (1 if ticket.startswith("pst_") and len(ticket) == 47 else 0)

    only_quart(monkeypatch)
    assert answer(await http.get(SSE_PATH, params={"ticket": ticket})) == fast
    assert quart_requests.count(SSE_PATH) == 1
    assert fast[0] == 401 and orjson.loads(fast[2])["error"] == "invalid_ticket"
    assert fast[1]["www-authenticate"].startswith("Bearer")


async def test_a_tenant_at_its_limit_is_refused_alike_by_both_doors(
    settings: Settings, make_token: Callable[..., str], quart_requests: list[str]
) -> None:
    """A token's refusal is Quart's; a ticket's, once spent, is the fast path's own."""
    limited = dataclasses.replace(settings, max_connections_per_tenant=1)
    token = make_token("t1", lifetime_s=600)
    auth = {"Authorization": f"Bearer {token}"}
    async with (
        running_server(limited) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        http.stream("GET", SSE_PATH, headers=auth) as first,
    ):
        await read_body(first, b"retry")
        await sse_connections(http, 1)
        assert SSE_PATH not in quart_requests
        by_quart = await http.get(SSE_PATH, headers=auth)
        assert quart_requests.count(SSE_PATH) == 1

        ticket = await new_ticket(http, token)
        by_fast_path = await http.get(SSE_PATH, params={"ticket": ticket})
        assert quart_requests.count(SSE_PATH) == 1
        for refused in (by_quart, by_fast_path):
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == "5"
            assert refused.headers["content-type"] == "application/json"
        assert by_fast_path.json() == by_quart.json()
        assert by_fast_path.json()["error"] == "connection_limit"

        # As through Quart, the ticket was spent on the refused request.
        again = await http.get(SSE_PATH, params={"ticket": ticket})
        assert again.status_code == 401 and again.json()["error"] == "invalid_ticket"
        assert quart_requests.count(SSE_PATH) == 1


async def test_a_client_that_leaves_frees_its_slot_at_once(
    settings: Settings, make_token: Callable[..., str], quart_requests: list[str]
) -> None:
    """Nothing is written to an idle stream for a minute here: the server learns that
    the client left from the connection itself, not from a write that fails."""
    quiet = dataclasses.replace(settings, sse_keepalive_s=60)
    auth = {"Authorization": f"Bearer {make_token('t1')}"}
    async with running_server(quiet) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        async with http.stream("GET", SSE_PATH, headers=auth) as stream:
            await read_body(stream, b"retry")
            await sse_connections(http, 1)
        await sse_connections(http, 0)
        assert SSE_PATH not in quart_requests
