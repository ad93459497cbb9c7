"""Idle messages come after silence only (CONTRACT 5.1: a ping "after 30 s without a
message"; 5.2: a keepalive when idle): while events flow, written straight to the
client by the hub without waking the stream's task, neither a ping nor a keepalive is
sent; once they stop, one is.

Events are committed every 50 ms for 5 s, and the idle time is 2 s: before the fix a
ping or keepalive came every 2 s whatever flowed. A stream's idle time runs from its
last message, so only a stall of 2 s between two commits, on the machine, would
bring one within the flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.streams.ws_support import open_ws, recv
from tests.support import insert_readings, running_server, sse_events

pytestmark = pytest.mark.timeout(60)

# Silence of IDLE_S between two commits of the flow (a stalled fsync, a busy machine)
# would put a ping in it: 3 s is far above any seen, and the flow still lasts two of it.
IDLE_S = 3.0
FLOW_S = 6.5
SSE_PATH = "/api/v1/customer/telemetry/stream/sse"


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    idle = dataclasses.replace(settings, ws_ping_s=IDLE_S, sse_keepalive_s=IDLE_S)
    async with running_server(idle) as base:
        yield base


@contextlib.asynccontextmanager
async def flowing(pool: asyncpg.Pool) -> AsyncIterator[asyncio.Task[int]]:
    writer = asyncio.create_task(flow(pool))
    try:
        yield writer
    finally:
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer


async def flow(pool: asyncpg.Pool) -> int:
    """Commit a reading every 50 ms for FLOW_S (more than 40); return the newest id."""
    loop = asyncio.get_running_loop()
    end = loop.time() + FLOW_S
    while True:
        newest = (await insert_readings(pool, "t1", [("d1", {"temp": 20.0})]))[-1]
        if loop.time() >= end and newest > 40:
            return newest
        await asyncio.sleep(0.05)


async def test_the_websocket_pings_only_after_silence(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    async with open_ws(url, token=make_token("t1")) as ws:
        assert (await recv(ws))["type"] == "connected"
        async with flowing(pool) as writer:
            events = 0
            while (message := await recv(ws, timeout=30))["type"] != "ping":
                assert message["type"] == "telemetry"
                events += 1
            # The first ping comes after every event, with the newest id.
            assert writer.done() and message["last_event_id"] == writer.result()
            assert events == writer.result()


async def test_sse_keeps_alive_only_after_silence(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    headers = {"Authorization": f"Bearer {make_token('t1')}", "Last-Event-ID": "0"}
    async with (
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        http.stream("GET", SSE_PATH, headers=headers) as response,
        flowing(pool) as writer,  # from id 0: replayed, then live
    ):
        events = aiter(sse_events(response, comments=True))
        newest = 0
        while (event := await asyncio.wait_for(anext(events), 30)).event is None:
            assert json.loads(event.data)["device_id"] == "d1"
            assert event.id is not None and int(event.id) == newest + 1
            newest += 1
        # The first keepalive comes after every event.
        assert event.event == ":"
        assert writer.done() and newest == writer.result()
