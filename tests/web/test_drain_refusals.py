"""A stream asked of a process that is shutting down is refused before its credential is
checked: SSE answers 503 with Retry-After, a WebSocket closes 1012, and a ticket stays
unspent for the process the client reconnects to (tickets are the cluster's)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from pulse.web import runtime_of
from tests.streams.ws_support import V2_PATH, WS_PATH, close_of
from tests.support import running_server

pytestmark = pytest.mark.timeout(60)

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"
TICKET_PATH = "/api/v1/stream-ticket"


async def test_streams_asked_while_draining_are_refused_before_spending_anything(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    apps: list[Any] = []
    token = make_token("t1", lifetime_s=600)
    async with (
        running_server(settings, on_app=apps.append) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        answer = await http.post(TICKET_PATH, headers={"Authorization": f"Bearer {token}"})
        ticket = answer.json()["ticket"]
        runtime_of(apps[0]).hub.drain()  # as on SIGTERM, before the listener closes

        for params, headers in (
            ({}, {"Authorization": f"Bearer {token}"}),
            ({"ticket": ticket}, {}),
        ):
            answer = await http.get(SSE_PATH, params=params, headers=headers)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"] == "database_unavailable"
            assert "shutting down" in answer.json()["detail"]
            assert answer.headers["retry-after"] == "2"
        for path in (WS_PATH, V2_PATH):
            assert await close_of(url, path, ticket=ticket) == (1012, "server_restarting")
        assert await pool.fetchval("SELECT count(*) FROM stream_tickets") == 1
