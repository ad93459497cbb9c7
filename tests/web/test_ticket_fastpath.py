"""The ticket fast path (pulse.web.ticket_fastpath) against Quart's route, over a real socket.

A ticket asked for with a valid token and no body is issued before Quart; every
request refused for its credential goes through Quart. Both doors must answer alike.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import httpx
import pytest

from pulse.config import Settings
from pulse.web.ticket_fastpath import TicketFastPath
from tests.streams.sse_client import SSE_PATH
from tests.support import running_server
from tests.web.test_sse import read_body
from tests.web.test_tickets import TICKET_PATH

pytestmark = pytest.mark.timeout(60)


def only_quart(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on every ticket request goes to Quart's route: the other door."""

    def to_quart(self: TicketFastPath, scope: object, receive: object, send: object) -> object:
        return self._inner(scope, receive, send)

    monkeypatch.setattr(TicketFastPath, "_serve", to_quart)


def _answer(r: httpx.Response) -> tuple[int, dict[str, str], dict[str, object]]:
    """Status, headers (but the date and the length, which differ with the ticket), and
    the body with its ticket checked and named."""
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ticket"].startswith("pst_") and len(r.content) == int(r.headers["content-length"])
    body["ticket"] = "pst_..."
    skip = {"date", "content-length"}
    return r.status_code, {k: v for k, v in r.headers.items() if k not in skip}, body


async def _stream_opens(http: httpx.AsyncClient, ticket: str) -> None:
    async with http.stream("GET", SSE_PATH, params={"ticket": ticket}) as r:
        assert r.status_code == 200, await r.aread()
        await read_body(r, b"retry")


async def test_tickets_skip_quart_and_answer_as_it_does(
    http: httpx.AsyncClient,
    make_token: Callable[..., str],
    quart_requests: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    token = make_token("t1")
    auth = {"Authorization": f"Bearer {token}"}
    page = {"Origin": str(http.base_url).rstrip("/")}
    fast = [await http.post(TICKET_PATH, headers=auth)]
    http.cookies.set("pulse_session", token)
    fast.append(await http.post(TICKET_PATH, headers=page))
    http.cookies.clear()
    assert TICKET_PATH not in quart_requests
    for r in fast:
        await _stream_opens(http, r.json()["ticket"])

    only_quart(monkeypatch)
    by_quart = await http.post(TICKET_PATH, headers=auth)
    assert quart_requests.count(TICKET_PATH) == 1
    await _stream_opens(http, by_quart.json()["ticket"])
    assert by_quart.headers["cache-control"] == "no-store"
    for r in fast:
        assert _answer(r) == _answer(by_quart)
        assert len(r.content) == len(by_quart.content)


@pytest.mark.parametrize(
    ("kind", "status", "error"),
    [
        ("no token", 401, "missing_token"),
        ("forged token", 401, "invalid_token"),
        ("token without a role", 403, "forbidden"),
        ("ticket for a token", 401, "invalid_token"),
        ("cookie from another site", 403, "origin_not_allowed"),
        ("token in the query", 401, "missing_token"),
        ("a body", 200, None),
    ],
)
async def test_the_rest_is_quarts(
    http: httpx.AsyncClient,
    make_token: Callable[..., str],
    quart_requests: list[str],
    kind: str,
    status: int,
    error: str | None,
) -> None:
    token = make_token("t1")
    headers: dict[str, str] = {}
    params: dict[str, str] = {}
    content = b""
    match kind:
        case "forged token":
            headers["Authorization"] = f"Bearer {token[:-4]}AAAA"
        case "token without a role":
            headers["Authorization"] = f"Bearer {make_token('t1', roles=())}"
        case "ticket for a token":
            r = await http.post(TICKET_PATH, headers={"Authorization": f"Bearer {token}"})
            headers["Authorization"] = f"Bearer {r.json()['ticket']}"
        case "cookie from another site":
            http.cookies.set("pulse_session", token)
            headers["Origin"] = "https://elsewhere.example"
        case "token in the query":
            params["token"] = token
        case "a body":
            headers["Authorization"] = f"Bearer {token}"
            content = b"{}"
    r = await http.post(TICKET_PATH, headers=headers, params=params, content=content)
    assert r.status_code == status, r.text
    if error is not None:
        assert r.json()["error"] == error
    assert quart_requests.count(TICKET_PATH) == 1


async def test_a_caller_over_its_rate_is_refused_alike_by_both_doors(
    settings: Settings,
    make_token: Callable[..., str],
    quart_requests: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    few = dataclasses.replace(settings, ticket_rate_per_s=0.001, ticket_burst=1)
    auth = {"Authorization": f"Bearer {make_token('t1')}"}
    async with running_server(few) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        assert (await http.post(TICKET_PATH, headers=auth)).status_code == 200
        by_fast_path = await http.post(TICKET_PATH, headers=auth)
        assert TICKET_PATH not in quart_requests
        only_quart(monkeypatch)
        by_quart = await http.post(TICKET_PATH, headers=auth)
        assert quart_requests.count(TICKET_PATH) == 1
    for refused in (by_fast_path, by_quart):
        assert refused.status_code == 429, refused.text
        assert 990 <= int(refused.headers["retry-after"]) <= 1000
        assert refused.json()["error"] == "rate_limited"
    # The same answer, but the seconds to wait, which count down between the two.
    assert _seconds_named(by_fast_path.content) == _seconds_named(by_quart.content)
    assert _seconds_named(by_fast_path.content) != by_fast_path.content
    assert _headers(by_fast_path) == _headers(by_quart)


def _seconds_named(body: bytes) -> bytes:
    return re.sub(rb"\d+ s\b", b"N s", body)


def _headers(r: httpx.Response) -> dict[str, str]:
    # The body's length too: "999 s" and "1000 s" when the countdown crosses a digit.
    skip = ("date", "retry-after", "content-length")
    return {k: v for k, v in r.headers.items() if k not in skip}
