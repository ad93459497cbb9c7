"""Exactly-once resume over the telemetry WebSocket, as for SSE: concurrent writers,
clients that drop at random moments (closing or just vanishing) and resume."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from pulse.config import Settings
from tests.streams.ws_support import WS_PATH, until_no_connections, ws_url
from tests.support import running_server
from tests.web.test_sse import table_ids, writer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    fast = dataclasses.replace(settings, ws_ping_s=0.2, listener_backoff_max_s=0.3)
    async with running_server(fast) as base:
        yield base


class ResumingWsClient:
    """Reads the telemetry WebSocket, drops the connection at random moments, resumes
    with last_event_id (from the last event or ping), and keeps every id it received."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        params: dict[str, str] | None = None,
        actions: list[dict[str, object]] | None = None,
        seed: int = 0,
    ) -> None:
        self.base_url = base_url
        self.token = token
        self.params = params or {}
        self.actions = actions or []
        self.last_id = 0
        self.ids: list[int] = []
        self.events: list[dict[str, object]] = []
        self.connections = 0
        self._random = random.Random(seed)

    async def run(self, done: Callable[[ResumingWsClient], bool]) -> None:
        while not done(self):
            await self._one_connection(self._random.randint(5, 60), done)

    async def _one_connection(self, budget: int, done: Callable[[ResumingWsClient], bool]) -> None:
        self.connections += 1
        url = ws_url(
            self.base_url, WS_PATH, token=self.token, last_event_id=self.last_id, **self.params
        )
        with contextlib.suppress(ConnectionClosed, OSError):
            # A client that stops reading with events in flight has paused its
            # socket, so it cannot see the server's close frame: its clean close
            # waits close_timeout (10 s by default) and then aborts.
            async with connect(url, open_timeout=10, close_timeout=1) as ws:
                connected = json.loads(await ws.recv())
                assert connected["type"] == "connected", connected
                for action in self.actions:  # resubscribe, as a reconnecting client does
                    await ws.send(json.dumps(action))
                async for data in ws:
                    message = json.loads(data)
                    if message["type"] == "telemetry":
                        assert message["id"] > self.last_id, (message["id"], self.last_id)
                        self.ids.append(message["id"])
                        self.events.append(message)
                        self.last_id = message["id"]
                        budget -= 1
                    elif message["type"] == "ping":
                        self.last_id = max(self.last_id, message["last_event_id"])
                    elif message["type"] == "error":
                        raise AssertionError(message)
                    if done(self):
                        return
                    if budget <= 0:
                        if self._random.random() < 0.5:
                            # Vanish without a close frame, as a dropped network would.
                            ws.transport.abort()
                        return


async def test_exactly_once_under_fire(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    token = make_token("t1")
    clients = {
        "all": ResumingWsClient(url, token, seed=1),
        "all2": ResumingWsClient(url, token, seed=2),
        "devices": ResumingWsClient(url, token, params={"device_id": "d1,d3"}, seed=3),
        "metric": ResumingWsClient(url, token, params={"metric": "hum"}, seed=4),
        # Filters set by actions on every connection, not by the query.
        "actions": ResumingWsClient(
            url,
            token,
            params={"device_id": "d2"},
            actions=[{"action": "subscribe", "device_id": "d4"}],
            seed=5,
        ),
    }
    final: list[int] = []

    def caught_up(client: ResumingWsClient) -> bool:
        return bool(final) and client.last_id >= final[0]

    readers = [asyncio.create_task(c.run(caught_up)) for c in clients.values()]
    rng = random.Random(42)
    await asyncio.gather(*(writer(pool, "t1", random.Random(rng.random()), 25) for _ in range(6)))
    final.append(await pool.fetchval("SELECT last_event_id FROM tenants WHERE tenant_id = 't1'"))
    try:
        await asyncio.wait_for(asyncio.gather(*readers), 60)
    except TimeoutError:
        state = {k: (c.last_id, len(c.ids), c.connections) for k, c in clients.items()}
        raise AssertionError(f"clients did not catch up to {final}: {state}") from None

    everything = await table_ids(pool, "t1")
    assert everything == list(range(1, final[0] + 1))
    assert clients["all"].ids == everything
    assert clients["all2"].ids == everything
    assert clients["devices"].ids == await table_ids(pool, "t1", "device_id IN ('d1', 'd3')")
    assert clients["metric"].ids == await table_ids(pool, "t1", "metrics ? 'hum'")
    assert all(set(e["data"]["metrics"]) == {"hum"} for e in clients["metric"].events)  # type: ignore[index]
    # The subscribe action lands after the replay has begun: from each connection's
    # start, d4 joins d2; what was replayed before it landed is only d2's.
    got = clients["actions"].ids
    assert set(got) <= set(await table_ids(pool, "t1", "device_id IN ('d2', 'd4')"))
    assert set(await table_ids(pool, "t1", "device_id = 'd2'")) <= set(got)
    assert got == sorted(set(got))
    assert all(c.connections > 2 for c in clients.values())
    await until_no_connections(url, pool)
