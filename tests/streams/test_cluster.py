"""Two `pulse serve` processes on one database: ingest through one, stream from the other,
tickets valid on both, the per-tenant limit held across both, a crashed process's
connections expiring, and no token or ticket in any log line of either."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from pulse.streams.limits import ConnectionLimits
from tests.streams.sse_client import SSE_PATH
from tests.streams.ws_support import (
    V2_PATH,
    WS_PATH,
    close_of,
    closed,
    open_ws,
    recv,
    request,
)
from tests.support import provision_device, pulse_serve, seam, sse_events

pytestmark = pytest.mark.timeout(120)

# Long enough that a busy machine's stall does not lapse a live process's lease (renewed every
# third of it), short enough to wait for a crashed one's.
LEASE_TTL_S = 4.0


async def test_two_processes_one_database(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    env = {
        "PULSE_MAX_CONNECTIONS_PER_TENANT": "3",
        "PULSE_CONNECTION_LEASE_TTL_S": str(LEASE_TTL_S),
        "PULSE_ACCESS_LOG": "1",
    }
    device_token = await provision_device(pool, "t1", "d1")
    token = make_token("t1")
    secrets = [token, device_token]
    async with (
        pulse_serve(data_dir=tmp_path / "a", database_url=database_url, env=env, stdout=-1) as a,
        pulse_serve(data_dir=tmp_path / "b", database_url=database_url, env=env, stdout=-1) as b,
        httpx.AsyncClient(timeout=10) as http,
    ):
        # Ingest through A, stream from B: the telemetry WebSocket and v2.
        async with (
            open_ws(b.url, WS_PATH, token=token) as stream,
            open_ws(b.url, V2_PATH, token=token) as legacy,
        ):
            await recv(stream)
            await request(legacy, {"action": "subscribe", "type": "device", "device_id": "d1"})
            r = await http.post(
                f"{a.url}/ingest/v1/tenant/t1/device/d1/telemetry",
                headers={"X-Provision-Token": device_token},
                json={"metrics": {"temp": 21.5}},
            )
            assert r.status_code == 201
            event_id = r.json()["id"]
            for ws in (stream, legacy):
                event = await recv(ws)
                assert event["id"] == event_id and event["data"]["metrics"] == {"temp": 21.5}

            # A ticket from A works once, on B; not again, on either.
            r = await http.post(
                f"{a.url}/api/v1/stream-ticket", headers={"Authorization": f"Bearer {token}"}
            )
            ticket = r.json()["ticket"]
            secrets.append(ticket)
            async with open_ws(b.url, WS_PATH, ticket=ticket, last_event_id=0) as third:
                assert (await recv(third))["type"] == "connected"
                assert (await recv(third))["id"] == event_id  # replayed
                for server in (a, b):
                    assert await close_of(server.url, WS_PATH, ticket=ticket) == (
                        4001,
                        "invalid_ticket",
                    )
                    # t1 holds 3 connections, all on B: A refuses a fourth too.
                    for path in (WS_PATH, V2_PATH):
                        assert await close_of(server.url, path, token=token) == (
                            4029,
                            "connection_limit",
                        )
                    r = await http.get(
                        f"{server.url}{SSE_PATH}", headers={"Authorization": f"Bearer {token}"}
                    )
                    assert r.status_code == 429
                    # Another tenant is not affected.
                    async with open_ws(server.url, WS_PATH, token=make_token("t2")) as other:
                        assert (await recv(other))["tenant_id"] == "t2"
        # All closed. A client's close completes before its server has freed the
        # slot (a database write after the handler ends): wait for that first.
        for _ in range(100):
            if not await pool.fetchval(
                "SELECT count(*) FROM stream_connections WHERE tenant_id = 't1'"
            ):
                break
            await asyncio.sleep(0.05)
        # A admits three again, and B none beyond them.
        async with (
            open_ws(a.url, WS_PATH, token=token) as one,
            open_ws(a.url, V2_PATH, token=token) as two,
            open_ws(b.url, WS_PATH, token=token) as three,
        ):
            await recv(one)
            await request(two, {"action": "subscribe", "type": "fleet"})
            await recv(three)
            assert await close_of(b.url, WS_PATH, token=token) == (4029, "connection_limit")
            assert (
                await pool.fetchval("SELECT count(DISTINCT process_id) FROM stream_connections")
                == 2
            )

            # A crashes with two of them: they stop counting within the lease's TTL.
            a.kill()
            crashed = time.monotonic()
            assert await close_of(b.url, WS_PATH, token=token) == (4029, "connection_limit")
            while True:
                async with open_ws(b.url, WS_PATH, token=token) as probe:
                    try:
                        admitted = (await recv(probe))["type"] == "connected"
                    except ConnectionClosed:
                        assert probe.close_code == 4029
                        admitted = False
                if admitted:
                    break
                assert time.monotonic() - crashed < LEASE_TTL_S + 2.5
                await asyncio.sleep(0.1)
            freed_after = time.monotonic() - crashed
        await a.stop()
    assert freed_after <= LEASE_TTL_S + 2.5, freed_after
    print(f"a crashed process's connections stopped counting after {freed_after:.2f} s")

    logs = a.stdout + a.stderr + b.stdout + b.stderr
    assert b"/api/v1/customer/telemetry/stream" in logs  # the access log is on
    assert b"/api/v1/stream-ticket" in logs
    for secret in secrets:
        assert secret.encode() not in logs
    assert b"token=" not in logs and b"ticket=" not in logs


async def test_a_process_stalled_past_its_lease_ends_its_streams_over_the_limit(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    """A server stopped (SIGSTOP) for longer than its lease: meanwhile another process
    (this test's ConnectionLimits) fills the tenant's limit of 3 with the server's three
    streams not counted. Once the server runs again, it admits its streams again, oldest
    first: the telemetry WebSocket stays, the v2 WebSocket closes 4029 and the SSE stream
    ends with its `error` event; the tenant counts 3 connections, not 5."""
    env = {
        "PULSE_MAX_CONNECTIONS_PER_TENANT": "3",
        "PULSE_CONNECTION_LEASE_TTL_S": str(LEASE_TTL_S),
    }
    device_token = await provision_device(pool, "t1", "d1")
    token = make_token("t1")
    auth = {"Authorization": f"Bearer {token}"}
    other = ConnectionLimits(seam(pool), 100, 3, ttl_s=60)
    await other.start()
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url, env=env) as server,
        httpx.AsyncClient(timeout=10) as http,
        open_ws(server.url, WS_PATH, token=token) as oldest,
    ):
        await recv(oldest)  # admitted first
        async with open_ws(server.url, V2_PATH, token=token) as legacy:
            await request(legacy, {"action": "subscribe", "type": "device", "device_id": "d1"})
            async with http.stream("GET", f"{server.url}{SSE_PATH}", headers=auth) as sse:
                assert sse.status_code == 200  # admitted: the slot comes before the head
                events = sse_events(sse)
                server.proc.send_signal(signal.SIGSTOP)
                try:
                    async with asyncio.timeout(LEASE_TTL_S + 10):
                        while not await pool.fetchval(  # noqa: ASYNC110  (no event)
                            "SELECT count(*) FROM stream_processes "
                            "WHERE description LIKE '%:' || $1 AND expires_at < clock_timestamp()",
                            str(server.proc.pid),
                        ):
                            await asyncio.sleep(0.05)
                    async with contextlib.AsyncExitStack() as held:
                        for _ in range(2):  # the server's three do not count now
                            await held.enter_async_context(other.hold("sse", "t1"))
                        assert (
                            await pool.fetchval(
                                "SELECT count(*) FROM stream_connections WHERE tenant_id = 't1'"
                            )
                            == 5
                        )
                        server.proc.send_signal(signal.SIGCONT)
                        async with asyncio.timeout(LEASE_TTL_S + 10):
                            ended = await anext(events)
                        assert (ended.event, json.loads(ended.data)) == (
                            "error",
                            {"reason": "connection_limit"},
                        )
                        assert await closed(legacy) == (4029, "connection_limit")
                        # The oldest stream goes on.
                        r = await http.post(
                            f"{server.url}/ingest/v1/tenant/t1/device/d1/telemetry",
                            headers={"X-Provision-Token": device_token},
                            json={"metrics": {"temp": 21.5}},
                        )
                        assert r.status_code == 201
                        assert (await recv(oldest))["id"] == r.json()["id"]
                        assert (
                            await pool.fetchval(
                                "SELECT count(*) FROM stream_connections WHERE tenant_id = 't1'"
                            )
                            == 3
                        )
                finally:
                    server.proc.send_signal(signal.SIGCONT)
    await other.stop()
