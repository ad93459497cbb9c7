"""The relay against what NATS refuses (the cluster audit, M1): a nats-server with a small
``max_payload``, a relay process and an edge process (in this test's loop), and a stream
on the edge. A commit too large for one message is split to fit the server; an event too
large for any message is left to the edges to read from the table; neither holds up the
tenant's later commits, which went through the audit's 5 s table check instead before."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.bus.test_nats_source import _relaying, eventually, status
from tests.streams.sse_client import ResumingClient
from tests.support import NatsServer, metric, running_server
from tests.web.test_sse import table_ids

pytestmark = pytest.mark.timeout(120)

MAX_PAYLOAD = 8192


async def commit(pool: asyncpg.Pool, tenant: str, metrics: list[dict[str, Any]]) -> int:
    """One transaction of ``len(metrics)`` readings; the last id."""
    async with pool.acquire() as conn, conn.transaction():
        base = await conn.fetchval("SELECT pulse_reserve_event_ids($1, $2)", tenant, len(metrics))
        await conn.execute(
            """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)
               SELECT $1, $2 + r.n, 'd1', now(), r.m
                 FROM unnest($3::jsonb[]) WITH ORDINALITY AS r(m, n)""",
            tenant,
            base,
            metrics,
        )
    return int(base) + len(metrics)


async def test_a_commit_larger_than_the_servers_max_payload_holds_up_nothing(
    settings: Settings,
    nats_binary: None,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pulse.bus")
    nats = NatsServer(max_payload=MAX_PAYLOAD)
    await nats.start()
    on_nats = dataclasses.replace(settings, bus_url=nats.url, sse_keepalive_s=0.3)
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    try:
        async with (
            running(on_nats) as (_, relay),
            running(dataclasses.replace(on_nats, bus_relay=False)) as (edge_url, edge),
        ):
            await eventually(lambda: _relaying(relay))
            await eventually(lambda: _on_bus(edge))
            final: list[int] = []
            client = ResumingClient(edge_url, make_token("t1"), seed=7)
            reading = asyncio.create_task(
                client.run(
                    lambda c: bool(final) and (c.last_id or 0) >= final[0],
                    drop_after=(10**6, 10**6),  # one connection throughout
                )
            )
            await eventually(lambda: _subscribed(edge))

            # One reading larger than the server takes in any message (about 12 KB).
            too_large = [{f"metric_{k}": k for k in range(MAX_PAYLOAD // 10)}]
            await commit(pool, "t1", [{"v": 0}])
            # 200 readings of 10 metrics: about 15 KB, more than one message.
            await commit(pool, "t1", [{f"m{k}": k for k in range(10)} for _ in range(200)])
            await commit(pool, "t1", too_large)
            for i in range(5):
                await commit(pool, "t1", [{"v": i}])
            final.append(await commit(pool, "t1", too_large))  # and nothing after it

            # The relay published every event but the two too large, each once: the later
            # commits went out as they came, not through the edges' audit of the table.
            await eventually(lambda: _relayed(relay, 1 + 200 + 5), timeout=20)
            await asyncio.wait_for(reading, 30)
            assert client.ids == await table_ids(pool, "t1")  # in order, exactly once
            assert len(client.ids) == 1 + 200 + 1 + 5 + 1
            # The relay is past the last one too (the edge may have read it by its audit).
            await eventually(lambda: _refused(relay, 2), timeout=20)
            metrics = (await relay.get("/metrics")).text
            assert metric(metrics, "pulse_bus_events_relayed_total") == 1 + 200 + 5
            assert metric(metrics, 'pulse_bus_publish_failures_total{kind="events"}') == 2
            # A wake-up said there was something to read after a refused message no
            # other followed: after each of the two, or only after the second when the
            # relay read the five between with both in one pass (a CI run of 7 December
            # under load: the first gap was shown by the next message's `after`).
            wakeups: list[float] = []  # relayed, and received by the edge, once they agree
            await eventually(lambda: _wakeups_agree(relay, edge, wakeups))
            assert wakeups[-1] in (1, 2), wakeups
            assert (await status(relay))["bus"] == {
                "mode": "nats", "relay": True, "connected": True, "fallback": False
            }  # fmt: skip
            reading.cancel()
    finally:
        await nats.stop()
    # One line said why, and no traceback.
    said = [r for r in caplog.records if r.name.startswith("pulse.bus")]
    assert not [r for r in said if r.exc_info], [r.getMessage() for r in said if r.exc_info]
    refused = [r.getMessage() for r in said if "refused" in r.getMessage()]
    assert len(refused) == 1, refused  # the second within the same 10 s
    assert str(MAX_PAYLOAD) in refused[0], refused


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """A server, and an HTTP client of it."""
    async with running_server(settings) as url, httpx.AsyncClient(base_url=url) as http:
        yield url, http


async def _on_bus(http: httpx.AsyncClient) -> bool:
    bus = (await status(http))["bus"]
    return bool(bus["connected"] and not bus["fallback"])


async def _subscribed(http: httpx.AsyncClient) -> bool:
    return bool((await status(http))["listener"]["channels"] == 1)


async def _refused(http: httpx.AsyncClient, messages: int) -> bool:
    metrics = (await http.get("/metrics")).text
    return metric(metrics, 'pulse_bus_publish_failures_total{kind="events"}') >= messages


async def _wakeups_agree(
    relay: httpx.AsyncClient, edge: httpx.AsyncClient, seen: list[float]
) -> bool:
    """At least one wake-up relayed, and the edge has received as many (appended)."""
    relayed = metric((await relay.get("/metrics")).text, _WAKEUPS.format("relayed"))
    received = metric((await edge.get("/metrics")).text, _WAKEUPS.format("received"))
    seen.append(relayed)
    return relayed >= 1 and received == relayed


_WAKEUPS = 'pulse_bus_messages_{}_total{{kind="wakeup"}}'


async def _relayed(http: httpx.AsyncClient, events: int) -> bool:
    metrics = (await http.get("/metrics")).text
    return metric(metrics, "pulse_bus_events_relayed_total") >= events


async def test_a_relay_that_loses_nats_stops_saying_it_relays_with_the_connection(
    settings: Settings, nats_server: NatsServer
) -> None:
    """From the cluster audit (L1): for up to a second after NATS was lost (until the
    relay's next heartbeat), the status said ``"relay": true`` with ``"connected": false``,
    and ``pulse_bus_relay`` stayed 1. Every answer read while NATS goes away must agree."""
    on_nats = dataclasses.replace(settings, bus_url=nats_server.url)
    async with running(on_nats) as (_, http):
        await eventually(lambda: _relaying(http))
        await nats_server.kill()
        answers: list[dict[str, Any]] = []
        scrapes: list[tuple[float, float]] = []
        async with asyncio.timeout(20):
            while not answers or answers[-1]["connected"] or scrapes[-1][0]:
                answers.append((await status(http))["bus"])
                metrics = (await http.get("/metrics")).text
                scrapes.append(
                    (metric(metrics, "pulse_bus_connected"), metric(metrics, "pulse_bus_relay"))
                )
        assert [a for a in answers if a["relay"] and not a["connected"]] == []
        assert [s for s in scrapes if s[1] and not s[0]] == []
        assert (answers[-1]["relay"], answers[-1]["connected"]) == (False, False)
