"""A process on NATS (PULSE_BUS_URL), in this test's loop: it relays, delivers from the
messages, subscribes only to the tenants it serves, and serves through LISTEN while NATS
is away. The three-process cluster is tests/test_bus_cluster.py."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import random
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.streams.sse_client import ResumingClient
from tests.support import NatsServer, free_port, metric, running_server, until
from tests.web.test_sse import table_ids, writer

pytestmark = pytest.mark.timeout(120)

STATUS = "/api/v1/telemetry/stream/status"


async def status(http: httpx.AsyncClient) -> dict[str, Any]:
    return dict((await http.get(STATUS)).json())


async def eventually(check: Callable[[], Any], timeout: float = 10) -> None:
    """Until the awaitable made by ``check`` is truthy, for at most ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110  polling an HTTP endpoint
            await asyncio.sleep(0.05)


async def listeners(pool: asyncpg.Pool) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'pulse listener'"
        )
    )


async def pulse_subjects(nats_server: NatsServer) -> set[str]:
    """The subjects the (one) Pulse process's connection is subscribed to."""
    (ours,) = [s for n, s in (await nats_server.subscriptions()).items() if n.startswith("pulse ")]
    return ours


@pytest.fixture
def bus_settings(settings: Settings, nats_server: NatsServer) -> Settings:
    return dataclasses.replace(settings, bus_url=nats_server.url, sse_keepalive_s=0.3)


async def test_listen_mode_reports_itself(
    server: str, pool: asyncpg.Pool, bus_url: str | None
) -> None:
    if bus_url:
        pytest.skip("this run puts every server on NATS (PULSE_TEST_BUS=1)")
    async with httpx.AsyncClient(base_url=server) as http:
        body = await status(http)
    assert body["bus"] == {"mode": "listen", "relay": False, "connected": True}
    assert await listeners(pool) == 1


async def test_a_process_subscribes_only_to_the_tenants_it_serves(
    bus_settings: Settings,
    nats_server: NatsServer,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
) -> None:
    database = await pool.fetchval("SELECT pulse_bus_database_id()")
    relay = f"pulse.{database}.relay"
    t1 = f"pulse.{database}.t.t1"
    for tenant in ("t1", "t2", "t3"):
        await pool.execute("INSERT INTO tenants (tenant_id) VALUES ($1)", tenant)

    subjects = functools.partial(pulse_subjects, nats_server)

    async with running_server(bus_settings) as url, httpx.AsyncClient(base_url=url) as http:
        await eventually(lambda: _relaying(http))
        body = await status(http)
        assert body["bus"] == {"mode": "nats", "relay": True, "connected": True, "fallback": False}
        assert await subjects() == {relay}
        assert await listeners(pool) == 1  # the relay's connection, and nothing else

        final: list[int] = []
        client = ResumingClient(url, make_token("t1"), seed=1)
        reading = asyncio.create_task(
            client.run(lambda c: bool(final) and (c.last_id or 0) >= final[0])
        )
        await eventually(lambda: _has(subjects, t1))
        assert await subjects() == {relay, t1}  # t2 and t3 commit too, and are not asked for
        await asyncio.gather(
            *(
                writer(pool, tenant, random.Random(i), 20)
                for i, tenant in enumerate(["t1", "t2", "t3"] * 2)
            )
        )
        final.append(await pool.fetchval("SELECT last_event_id FROM tenants WHERE tenant_id='t1'"))
        await asyncio.wait_for(reading, 30)
        assert client.ids == await table_ids(pool, "t1")
        # The relay publishes every tenant's rows; t2's and t3's last ones may still be on
        # their way when t1's reader is done.
        rows = sum([len(await table_ids(pool, tenant)) for tenant in ("t1", "t2", "t3")])
        metrics = ""

        async def all_relayed() -> bool:
            nonlocal metrics
            metrics = (await http.get("/metrics")).text
            return metric(metrics, "pulse_bus_events_relayed_total") >= rows

        await eventually(all_relayed)
        await eventually(lambda: _has(subjects, t1, present=False))
        assert await subjects() == {relay}

    # Every t1 event came from the messages: the table was read for none of them.
    assert metric(metrics, "pulse_bus_gaps_filled_total") == 0
    assert metric(metrics, 'pulse_bus_messages_received_total{kind="events"}') > 0
    assert metric(metrics, "pulse_bus_events_relayed_total") == rows  # each once


async def test_without_nats_a_process_serves_through_listen_until_nats_comes(
    settings: Settings,
    nats_binary: None,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pulse.bus")
    nats = NatsServer()  # not started yet: its port refuses connections
    fast = dataclasses.replace(settings, bus_url=nats.url, sse_keepalive_s=0.3)
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    try:
        async with running_server(fast) as url, httpx.AsyncClient(base_url=url) as http:
            await eventually(lambda: _ready(http))
            body = await status(http)
            assert body["status"] == "ok"
            assert body["bus"] == {
                "mode": "nats", "relay": False, "connected": False, "fallback": True
            }  # fmt: skip
            final: list[int] = []
            client = ResumingClient(url, make_token("t1"), seed=2)
            reading = asyncio.create_task(
                client.run(
                    lambda c: bool(final) and (c.last_id or 0) >= final[0],
                    drop_after=(10**6, 10**6),  # stays on one connection throughout
                )
            )
            writing = asyncio.create_task(writer(pool, "t1", random.Random(3), 60))
            await until(lambda: len(client.ids) > 20, timeout=20)
            # The fallback's notifications count as the source's (the status said null,
            # then an age growing while the fallback delivered).
            age = (await status(http))["listener"]["last_notification_age_s"]
            assert age is not None and age < 10, age
            await nats.start()  # NATS arrives mid-stream: the process moves onto it
            await eventually(lambda: _relaying(http), timeout=20)
            await eventually(lambda: _off_fallback(http), timeout=20)
            await writing
            final.append(
                await pool.fetchval("SELECT last_event_id FROM tenants WHERE tenant_id='t1'")
            )
            await asyncio.wait_for(reading, 30)
            assert client.ids == await table_ids(pool, "t1")
            assert client.connections == 1  # the client saw no error, and no reconnect
            metrics = (await http.get("/metrics")).text
            assert metric(metrics, "pulse_bus_fallbacks_total") == 1
    finally:
        await nats.stop()
    back = [r for r in caplog.records if "back on NATS" in r.getMessage()]
    assert len(back) == 1, back  # when it was, and not again as the process stopped


async def test_a_tenant_first_watched_while_nats_was_away_is_subscribed_when_it_is_back(
    bus_settings: Settings,
    nats_server: NatsServer,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
) -> None:
    """From the review of 7 December (HIGH): a stream opened while NATS was away made no
    subscription (there was no connection), and the client that reconnected kept only
    the subscriptions it had had: back on NATS, the fallback closed, the tenant's
    readings came only with the audit, up to 5 s late, and its alerts and device changes
    not at all, with the status saying all was well. The process now subscribes, on the
    connection that came back, every tenant it watches."""
    database = await pool.fetchval("SELECT pulse_bus_database_id()")
    t1 = f"pulse.{database}.t.t1"
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")

    subjects = functools.partial(pulse_subjects, nats_server)

    async with running_server(bus_settings) as url, httpx.AsyncClient(base_url=url) as http:
        await eventually(lambda: _relaying(http))
        await nats_server.kill()
        await eventually(lambda: _on_fallback(http), timeout=20)
        final: list[int] = []
        client = ResumingClient(url, make_token("t1"), seed=4)
        reading = asyncio.create_task(
            client.run(
                lambda c: bool(final) and (c.last_id or 0) >= final[0],
                drop_after=(10**6, 10**6),  # stays on one connection throughout
            )
        )
        await writer(pool, "t1", random.Random(5), 5)
        listened = len(await table_ids(pool, "t1"))
        await until(lambda: len(client.ids) == listened, timeout=20)  # through LISTEN
        await nats_server.start()
        await eventually(lambda: _relaying(http), timeout=30)
        await eventually(lambda: _has(subjects, t1), timeout=20)
        await writer(pool, "t1", random.Random(6), 20)
        final.append(await pool.fetchval("SELECT last_event_id FROM tenants WHERE tenant_id='t1'"))
        await asyncio.wait_for(reading, 30)
        assert client.ids == await table_ids(pool, "t1")
        assert client.connections == 1


async def test_a_process_that_never_reached_nats_does_not_say_it_is_back_on_it(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """From the operations audit (LOW): with NATS never reachable, a process that fell
    back to LISTEN logged "bus: back on NATS; the fallback listener is closed" as it
    stopped, which closing the fallback said whatever the reason."""
    unreachable = dataclasses.replace(settings, bus_url=f"nats://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.INFO, logger="pulse.bus"):
        async with running_server(unreachable) as url, httpx.AsyncClient(base_url=url) as http:
            await eventually(lambda: _on_fallback(http), timeout=20)
    said = [r.getMessage() for r in caplog.records if r.name.startswith("pulse.bus")]
    assert any("delivering through LISTEN" in line for line in said), said
    assert not any("back on NATS" in line for line in said), said


async def _on_fallback(http: httpx.AsyncClient) -> bool:
    return bool((await status(http))["bus"]["fallback"])


async def _relaying(http: httpx.AsyncClient) -> bool:
    bus = (await status(http))["bus"]
    return bool(bus["relay"] and bus["connected"] and not bus["fallback"])


async def _off_fallback(http: httpx.AsyncClient) -> bool:
    return not (await status(http))["bus"]["fallback"]


async def _ready(http: httpx.AsyncClient) -> bool:
    return (await http.get("/readyz")).status_code == 200


async def _has(subjects: Callable[[], Any], subject: str, *, present: bool = True) -> bool:
    return (subject in await subjects()) == present


async def test_a_process_that_may_not_relay_never_does(
    bus_settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """PULSE_BUS_RELAY=0 with no relay anywhere: nobody publishes, so the process serves
    through LISTEN (after the relay's 3 s to be heard) and says so; nothing is lost."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    settings = dataclasses.replace(bus_settings, bus_relay=False)
    async with running_server(settings) as url, httpx.AsyncClient(base_url=url) as http:
        await eventually(lambda: _ready(http))
        assert (await status(http))["bus"] == {
            "mode": "nats", "relay": False, "connected": True, "fallback": True
        }  # fmt: skip
        final: list[int] = []
        client = ResumingClient(url, make_token("t1"), seed=4)
        reading = asyncio.create_task(
            client.run(lambda c: bool(final) and (c.last_id or 0) >= final[0])
        )
        await writer(pool, "t1", random.Random(5), 20)
        final.append(await pool.fetchval("SELECT last_event_id FROM tenants WHERE tenant_id='t1'"))
        await asyncio.wait_for(reading, 30)
        assert client.ids == await table_ids(pool, "t1")
        assert (await status(http))["bus"]["relay"] is False
    await eventually(lambda: _no_listener(pool))  # its fallback listener closed with it


async def _no_listener(pool: asyncpg.Pool) -> bool:
    return await listeners(pool) == 0
