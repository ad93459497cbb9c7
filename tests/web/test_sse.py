"""The SSE stream against a real server on loopback, with real writers in Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import re
import resource
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import asyncpg
import httpx
import orjson
import pytest

from pulse.bus import hub
from pulse.config import Settings
from tests.streams.sse_client import SSE_PATH, ResumingClient
from tests.support import insert_readings, running_server, sse_events, until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, sse_keepalive_s=0.3, listener_backoff_max_s=0.3)


@pytest.fixture
async def url(fast_settings: Settings) -> object:
    async with running_server(fast_settings) as base:
        yield base


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


_readers: dict[int, object] = {}


async def read_body(response: httpx.Response, until: bytes, timeout: float = 10) -> bytes:
    """Raw body bytes (chunked encoding removed) read from now until ``until`` has been seen."""
    chunks = _readers.setdefault(id(response), response.aiter_bytes())
    body = b""

    async def read() -> None:
        nonlocal body
        async for chunk in chunks:  # type: ignore[attr-defined]
            body += chunk
            if until in body:
                return

    await asyncio.wait_for(read(), timeout)
    return body


async def writer(pool: asyncpg.Pool, tenant: str, rng: random.Random, batches: int) -> None:
    """Commits small batches of random size with a random delay inside the transaction."""
    devices = ["d1", "d2", "d3", "d4"]
    for _ in range(batches):
        async with pool.acquire() as conn, conn.transaction():
            size = rng.randint(1, 12)
            base = await conn.fetchval("SELECT pulse_reserve_event_ids($1, $2)", tenant, size)
            await asyncio.sleep(rng.uniform(0, 0.01))
            rows = [
                (rng.choice(devices), {"temp": rng.random()} if rng.random() < 0.5 else {"hum": 1})
                for _ in range(size)
            ]
            await conn.execute(
                """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)
                   SELECT $1, $2 + r.n, r.d, now(), r.m
                     FROM unnest($3::text[], $4::jsonb[]) WITH ORDINALITY AS r(d, m, n)""",
                tenant,
                base,
                [d for d, _ in rows],
                [m for _, m in rows],
            )
        await asyncio.sleep(rng.uniform(0, 0.005))


async def table_ids(pool: asyncpg.Pool, tenant: str, where: str = "true") -> list[int]:
    rows = await pool.fetch(
        f"SELECT id FROM telemetry WHERE tenant_id = $1 AND {where} ORDER BY id", tenant
    )
    return [r["id"] for r in rows]


async def test_wire_format_is_exact(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await insert_readings(pool, "t1", [("d1", {"temp": 21.5}), ("d2", {"hum": 40})])
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        async with client.stream(
            "GET", SSE_PATH, headers={**auth(make_token("t1")), "Last-Event-ID": "0"}
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["cache-control"] == "no-cache"
            assert r.headers["x-accel-buffering"] == "no"
            body = await read_body(r, b": keepalive\n\n")
        first, second, rest = body.split(b"\n\n", 2)[0], None, None
        assert first == b"retry: 2000"
        frames = body.split(b"\n\n")
        assert frames[1].startswith(b'id: 1\ndata: {"type":"telemetry","id":1,"device_id":"d1",')
        event = orjson.loads(frames[1].split(b"data: ", 1)[1])
        assert event["data"]["metrics"] == {"temp": 21.5}
        assert event["data"]["time"].endswith("Z") and len(event["data"]["time"]) == 24
        assert frames[2].startswith(b"id: 2\ndata: ")
        assert frames[3] == b": keepalive"
        del second, rest

        # A filtered stream that passes filtered-out events sends a heartbeat with the newest id.
        async with client.stream(
            "GET", SSE_PATH, headers=auth(make_token("t1")), params={"device_id": "d9"}
        ) as r:
            await read_body(r, b"id: 2\n\n")  # live from id 2: the stream says where it starts
            ids = await insert_readings(pool, "t1", [("d1", {"temp": 1})])
            body = await read_body(r, b"data: {}\n\n")
            assert b"event: heartbeat\nid: %d\ndata: {}\n\n" % ids[-1] in body

        async def first_of_resumed(position: int) -> list[int]:
            """Commit a reading: a stream resumed from ``position`` starts with it."""
            between = await insert_readings(pool, "t1", [("d2", {"temp": 2})])
            async with client.stream(
                "GET", SSE_PATH, headers={**auth(make_token("t1")), "Last-Event-ID": str(position)}
            ) as r:
                body = await read_body(r, b"id: %d\ndata: " % between[0])
                assert body.startswith(b"retry: 2000\n\nid: %d\ndata: " % between[0])
            return between

        # A live stream says where it starts: a client that drops before any event
        # resumes from there and misses nothing committed in between.
        async with client.stream("GET", SSE_PATH, headers=auth(make_token("t1"))) as r:
            body = await read_body(r, b"id: %d\n\n" % ids[-1])
            assert body == b"retry: 2000\n\nid: %d\n\n" % ids[-1]
        ids += await first_of_resumed(ids[-1])

        # A filter given twice is one list (as HTTP libraries send a list), on the Quart
        # route (a ticket) as before it (a token); a position given twice is no position.
        ticket = (
            await client.post("/api/v1/stream-ticket", headers=auth(make_token("t1")))
        ).json()["ticket"]
        for credential in ({"token": make_token("t1")}, {"ticket": ticket}):
            params = [*credential.items(), ("device_id", "d1"), ("device_id", "d2")]
            params += [("last_event_id", str(ids[-2]))]
            async with client.stream("GET", SSE_PATH, params=params) as r:
                assert r.status_code == 200, credential
                body = await read_body(r, b"id: %d\ndata: " % ids[-1])
                assert b'"device_id":"d2"' in body, credential
            r = await client.get(
                SSE_PATH,
                params=[*credential.items(), ("last_event_id", "1"), ("last_event_id", "2")],
            )
            assert r.status_code == 400 and r.json()["error"] == "invalid_parameter"
        # So is a tenant given twice, as on both WebSockets (the review of 7 December:
        # the first was taken, so a customer of t1 asking for t1 and t2 had t1's stream).
        operator = make_token(None, roles=("operator",))
        for token, tenants in ((make_token("t1"), ("t1", "t2")), (operator, ("t2", "t1"))):
            params = [("token", token), *(("tenant_id", tenant) for tenant in tenants)]
            r = await client.get(SSE_PATH, params=params)
            assert r.status_code == 400 and r.json()["error"] == "invalid_tenant_id", tenants

        # Positions no bigint holds are as far ahead (they were refused as malformed).
        for far in ("9223372036854775807", "9223372036854775808", "1" + "0" * 30):
            async with client.stream(
                "GET", SSE_PATH, headers={**auth(make_token("t1")), "Last-Event-ID": far}
            ) as r:
                assert r.status_code == 200, far
                body = await read_body(r, b"}\n\n")
                assert b'"reason":"unknown_position","last_event_id":%d}' % ids[-1] in body

        # A position ahead of the newest id: reset, then live. The reset carries the
        # newest id as its own, so an EventSource that drops before the next event
        # comes back from there and misses nothing committed in between.
        async with client.stream(
            "GET", SSE_PATH, headers={**auth(make_token("t1")), "Last-Event-ID": "999"}
        ) as r:
            body = await read_body(r, b"}\n\n")
            assert body == (
                b"retry: 2000\n\n"
                b"event: reset\nid: %d\n"
                b'data: {"reason":"unknown_position","last_event_id":%d}\n\n' % (ids[-1], ids[-1])
            )
        ids += await first_of_resumed(ids[-1])

        # A position older than what is kept: reset, then from the earliest kept event.
        await pool.execute("DELETE FROM telemetry WHERE tenant_id = 't1' AND id <= 2")
        async with client.stream(
            "GET", SSE_PATH, headers=auth(make_token("t1")), params={"last_event_id": "1"}
        ) as r:
            body = await read_body(r, b"id: 3\n")
            assert body.startswith(
                b"retry: 2000\n\n"
                b'event: reset\ndata: {"reason":"history_trimmed","earliest_id":3}\n\n'
                b"id: 3\ndata: "
            )


async def test_bad_requests_get_the_error_body(url: str, make_token: Callable[..., str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        r = await client.get(SSE_PATH)
        assert r.status_code == 401 and r.json()["error"] == "missing_token"
        r = await client.get(SSE_PATH, headers=auth("not-a-jwt"))
        assert r.status_code == 401 and set(r.json()) == {"error", "detail"}
        r = await client.get(SSE_PATH, headers={**auth(make_token()), "Last-Event-ID": "-4"})
        assert r.status_code == 400 and r.json()["error"] == "invalid_parameter"
        # Digits that are not ASCII: '²' (int() refuses it), Arabic-Indic and fullwidth
        # digits (int() would read them as 3).
        for position in ("\u00b2", "\u0663", "\uff13"):
            r = await client.get(
                SSE_PATH, headers=auth(make_token()), params={"last_event_id": position}
            )
            assert r.status_code == 400 and r.json()["error"] == "invalid_parameter", position
        # A header is read as latin-1: b"\xb2" is '²'.
        for header in (b"\xb2", "\u0663".encode(), b"\xb9\xb2"):
            headers = [
                (b"Authorization", f"Bearer {make_token()}".encode()),
                (b"Last-Event-ID", header),
            ]
            r = await client.get(SSE_PATH, headers=headers)
            assert r.status_code == 400 and r.json()["error"] == "invalid_parameter", header
        r = await client.get(SSE_PATH, headers=auth(make_token()), params={"device_id": "bad id!"})
        assert r.status_code == 400
        r = await client.get(SSE_PATH, headers=auth(make_token("t1")), params={"tenant_id": "t2"})
        assert r.status_code == 403
        r = await client.get(SSE_PATH, headers=auth(make_token(None, roles=("operator",))))
        assert r.status_code == 400 and r.json()["error"] == "tenant_required"


async def test_exactly_once_under_fire(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """Concurrent writers; clients that drop at random and resume: every id once, in order."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    token = make_token("t1")
    clients = {
        "all": ResumingClient(url, token, seed=1),
        "all2": ResumingClient(url, token, seed=2),
        "devices": ResumingClient(url, token, params={"device_id": "d1,d3"}, seed=3),
        "metric": ResumingClient(url, token, params={"metric": "hum"}, seed=4),
    }
    final: list[int] = []

    def caught_up(client: ResumingClient) -> bool:
        return bool(final) and (client.last_id or 0) >= final[0]

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
    assert all(c.connections > 2 for c in clients.values())


async def test_listener_killed_mid_stream(
    url: str,
    pool: asyncpg.Pool,
    pg_admin_dsn: str,
    database_url: str,
    make_token: Callable[..., str],
    bus_url: str | None,
) -> None:
    """On NATS (PULSE_TEST_BUS=1) the listener killed is the relay's: its heartbeats stop,
    the process falls back to LISTEN, and the stream goes on the same."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    token = make_token("t1")
    final: list[int] = []
    client = ResumingClient(url, token, seed=7)
    reader = asyncio.create_task(
        client.run(
            lambda c: bool(final) and (c.last_id or 0) >= final[0], drop_after=(10**6, 10**6)
        )
    )
    dbname = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin_dsn)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        # Ready, on NATS once a relay is heard (beside other tests' servers, a relay's
        # heartbeat can be late, and the process between the bus and its fallback).
        deadline = asyncio.get_running_loop().time() + 20
        while (r := await http.get("/readyz")).status_code != 200:
            assert asyncio.get_running_loop().time() < deadline, r.json()
            await asyncio.sleep(0.05)
        # Counted from here: a relay slow to be elected on a busy machine may have sent
        # the process to its fallback once already at start.
        fallbacks = _counter((await http.get("/metrics")).text, "pulse_bus_fallbacks_total")
        async with contextlib.AsyncExitStack() as warm:  # the writers' connections, made now:
            for _ in range(3):  # none can be made while the database refuses them
                await warm.enter_async_context(pool.acquire())
        writers = asyncio.gather(*(writer(pool, "t1", random.Random(i), 30) for i in range(3)))
        await asyncio.sleep(0.2)
        # Keep the listener out while it is gone, so its absence is observable.
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'pulse listener' AND datname = $1",
            dbname,
        )
        assert killed == 1
        # Until the listener is said gone: a 503 may come first for the database alone
        # (it refuses new connections), and on NATS the relay's silence is noticed later.
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            r = await http.get("/readyz")
            if r.status_code == 503 and r.json()["listener"] is False:
                break
            assert asyncio.get_running_loop().time() < deadline, r.json()
            await asyncio.sleep(0.05)
        assert (await http.get("/api/v1/telemetry/stream/status")).json()["status"] == "degraded"
        await asyncio.sleep(0.3)  # writers keep committing while the listener is away
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        await writers
        final.append(await pool.fetchval("SELECT last_event_id FROM tenants WHERE tenant_id='t1'"))
        await asyncio.wait_for(reader, 30)
        for _ in range(100):
            if (await http.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        status = (await http.get("/api/v1/telemetry/stream/status")).json()
        metrics = (await http.get("/metrics")).text
        if bus_url:
            assert status["status"] == "ok"
            assert _counter(metrics, "pulse_bus_fallbacks_total") == fallbacks + 1
        else:
            assert status["status"] == "ok" and status["listener"]["reconnects"] >= 1
            assert "pulse_listener_reconnects_total 1.0" in metrics
    await admin.close()
    assert client.ids == await table_ids(pool, "t1")
    assert client.connections == 1  # the stream itself never broke


def _counter(metrics: str, name: str) -> float:
    """A counter's value in a /metrics page (0 when it is not there)."""
    found = re.search(rf"^{name} (\S+)$", metrics, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def test_the_head_of_a_live_stream_is_its_start(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that has the response head misses nothing committed after it, however
    late the server reads the tenant's newest id: a dashboard that opens a stream and
    then asks a device to report sees the report."""
    from pulse.bus.store import EventStore

    await insert_readings(pool, "t1", [("d1", {"temp": 1})])
    real = EventStore.newest_id
    asked, answer = asyncio.Event(), asyncio.Event()

    async def held(self: EventStore, tenant_id: str) -> int:
        asked.set()
        await answer.wait()  # the start is read as late as the test lets it
        return await real(self, tenant_id)

    monkeypatch.setattr(EventStore, "newest_id", held)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        opening = asyncio.create_task(
            client.send(
                client.build_request("GET", SSE_PATH, headers=auth(make_token("t1"))), stream=True
            )
        )
        await asyncio.wait_for(asyncio.shield(asked.wait()), 10)
        if opening.done():  # the head came before the start was read
            committed = await insert_readings(pool, "t1", [("d2", {"temp": 2})])
            answer.set()
        else:
            answer.set()
            await asyncio.wait_for(asyncio.shield(opening), 10)
            committed = await insert_readings(pool, "t1", [("d2", {"temp": 2})])
        response = await opening
        try:
            body = await read_body(response, b'"device_id":"d2"')
        finally:
            await response.aclose()
    assert b"id: %d\ndata: " % committed[0] in body


async def test_tenant_isolation(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    for tenant in ("ta", "tb"):
        await pool.execute("INSERT INTO tenants (tenant_id) VALUES ($1)", tenant)
    done = lambda c: (c.last_id or 0) >= 20  # noqa: E731
    b_all = ResumingClient(url, make_token("tb"), seed=1)
    b_same_device = ResumingClient(url, make_token("tb"), params={"device_id": "d1"}, seed=2)
    operator_a = ResumingClient(
        url, make_token(None, roles=("operator",)), params={"tenant_id": "ta"}, seed=3
    )
    tasks = [asyncio.create_task(c.run(done)) for c in (b_all, b_same_device, operator_a)]
    for i in range(20):
        await insert_readings(pool, "ta", [("d1", {"secret_a": i})])
        await insert_readings(pool, "tb", [("d1", {"b": i})])
    await asyncio.wait_for(asyncio.gather(*tasks), 30)
    for client in (b_all, b_same_device):
        assert client.ids == list(range(1, 21))
        assert all("secret_a" not in orjson.dumps(e).decode() for e in client.events)
    assert [e["data"]["metrics"] for e in operator_a.events] == [{"secret_a": i} for i in range(20)]  # type: ignore[index]
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        r = await http.get(SSE_PATH, headers=auth(make_token("tb")), params={"tenant_id": "ta"})
        assert r.status_code == 403 and r.json()["error"] == "forbidden"


async def test_lagging_client_is_cut_and_resumes(
    settings: Settings,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The stalled client reads what was buffered only after the fast one is done: on
    # a loaded machine that may be past the grace, after which an unread connection
    # is dropped (tests/serving/test_direct.py).
    monkeypatch.setattr(hub, "LAGGING_GRACE_S", 60.0)
    small = dataclasses.replace(settings, queue_size=300, sse_keepalive_s=0.3)
    async with running_server(small) as url:
        await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
        token = make_token("t1")
        # A fixed receive buffer (no autotuning) larger than loopback's 64 kB segments,
        # so what the stalled client does not read backs up into the server.
        small_buffer = httpx.AsyncHTTPTransport(
            socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)]
        )
        async with (
            httpx.AsyncClient(base_url=url, timeout=30, transport=small_buffer) as slow,
            httpx.AsyncClient(base_url=url, timeout=30) as fast,
        ):
            async with (
                slow.stream("GET", SSE_PATH, headers=auth(token)) as stalled,
                fast.stream("GET", SSE_PATH, headers=auth(token)) as reading,
            ):
                # Both streams have started (the resume point, `id: 0`, comes first)
                # before anything is committed: the response's head comes before that.
                lines = {r: r.aiter_lines() for r in (stalled, reading)}
                for stream_lines in lines.values():
                    async with asyncio.timeout(10):
                        async for line in stream_lines:
                            if line.startswith("id:"):
                                assert line == "id: 0"
                                break
                fast_ids: list[int] = []

                async def read_fast() -> None:
                    async for event in sse_events(reading, lines=lines[reading]):
                        fast_ids.append(int(event.id or 0))
                        if len(fast_ids) == 3000:
                            return

                reader = asyncio.create_task(read_fast())
                big = {f"m{i:03d}": float(i) for i in range(200)}  # ~4.5 kB per event
                for _ in range(60):
                    last = (await insert_readings(pool, "t1", [("d1", big)] * 50))[-1]
                    # Each commit delivered before the next: a listener that fell behind
                    # would publish several at once, more than a queue holds, and cut
                    # the fast client as lagging too.
                    await until(lambda last=last: bool(fast_ids) and fast_ids[-1] >= last, 10)
                await asyncio.wait_for(reader, 30)
                assert fast_ids == list(range(1, 3001))
                # Now the stalled client reads what was buffered: it ends with `lagging`.
                got: list[int] = []
                ended_with = None
                async for event in sse_events(stalled, lines=lines[stalled]):
                    if event.event == "lagging":
                        ended_with = "lagging"
                    elif event.id:
                        got.append(int(event.id))
                assert ended_with == "lagging"
                assert got == list(range(1, len(got) + 1)) and len(got) < 3000
            metrics = (await fast.get("/metrics")).text
            assert 'pulse_lagging_disconnects_total{kind="sse"} 1.0' in metrics
            resumed = ResumingClient(url, token, last_id=got[-1])
            await asyncio.wait_for(resumed.run(lambda c: (c.last_id or 0) >= 3000), 30)
            assert got + resumed.ids == list(range(1, 3001))


async def test_token_expiry_ends_stream_and_resume_loses_nothing(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await insert_readings(pool, "t1", [("d1", {"temp": 1})])
    short = make_token("t1", lifetime_s=1.5)
    received: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        async with client.stream(
            "GET", SSE_PATH, headers={**auth(short), "Last-Event-ID": "0"}
        ) as r:

            async def consume() -> None:
                async for event in sse_events(r):
                    if event.id and event.event is None:
                        received.append(int(event.id))

            await asyncio.wait_for(consume(), 10)  # returns because the server ends the stream
        await insert_readings(pool, "t1", [("d1", {"temp": 2}), ("d1", {"temp": 3})])
        resumed = ResumingClient(url, make_token("t1"), last_id=received[-1])
        await asyncio.wait_for(resumed.run(lambda c: (c.last_id or 0) >= 3), 10)
    assert received == [1]
    assert resumed.ids == [2, 3]


async def test_status_and_metrics_follow_connections(
    url: str, make_token: Callable[..., str]
) -> None:
    status_path = "/api/v1/telemetry/stream/status"
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        # The event source connects in the background once the server is up (with
        # PULSE_TEST_BUS=1 through NATS, which on a busy machine takes a moment).
        async with asyncio.timeout(30):
            while not (before := (await http.get(status_path)).json())["listener"]["connected"]:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert before["connections"] == {"total": 0, "websocket": 0, "sse": 0, "legacy_v2": 0}
        assert before["limits"]["queue_size"] == 1000
        # The server runs in this process: its limit of open files is this one's.
        assert before["limits"]["max_open_files"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        async with (
            http.stream("GET", SSE_PATH, headers=auth(make_token("t1"))) as a,
            http.stream("GET", SSE_PATH, headers=auth(make_token("t2"))) as b,
        ):
            await read_body(a, b"retry")
            await read_body(b, b"retry")
            for _ in range(100):  # the subscriptions start just after `retry:`
                during = (await http.get(status_path)).json()
                if during["listener"]["channels"] == 2:
                    break
                await asyncio.sleep(0.05)
            assert during["connections"]["sse"] == 2 and during["connections"]["total"] == 2
            assert during["listener"]["channels"] == 2
            assert "t1" not in orjson.dumps(during).decode()
            assert 'pulse_stream_connections{kind="sse"} 2.0' in (await http.get("/metrics")).text
        for _ in range(100):
            after = (await http.get(status_path)).json()
            if after["connections"]["sse"] == 0 and after["listener"]["channels"] == 0:
                break
            await asyncio.sleep(0.05)
        assert after["connections"]["sse"] == 0 and after["listener"]["channels"] == 0


async def test_connection_limits(settings: Settings, make_token: Callable[..., str]) -> None:
    limited = dataclasses.replace(settings, max_connections_per_tenant=2, max_connections=3)
    async with (
        running_server(limited) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        http.stream("GET", SSE_PATH, headers=auth(make_token("t1"))) as a,
        http.stream("GET", SSE_PATH, headers=auth(make_token("t1"))) as b,
    ):
        await read_body(a, b"retry")
        await read_body(b, b"retry")
        r = await http.get(SSE_PATH, headers=auth(make_token("t1")))
        assert r.status_code == 429 and r.json()["error"] == "connection_limit"
        async with http.stream("GET", SSE_PATH, headers=auth(make_token("t2"))) as c:
            await read_body(c, b"retry")
            r = await http.get(SSE_PATH, headers=auth(make_token("t3")))
            assert r.status_code == 429


async def test_a_stream_refused_for_its_limit_after_the_check_is_still_a_429(
    settings: Settings, make_token: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check before the head reads counts that may be a moment old: a stream that
    passed it, then lost the last slot to another, was a 200 whose body was one
    `event: error`. The slot is now taken before the head: a 429 with Retry-After."""
    limited = dataclasses.replace(settings, max_connections_per_tenant=1)
    async with (
        running_server(limited) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
        http.stream("GET", SSE_PATH, headers=auth(make_token("t1"))) as first,
    ):
        await read_body(first, b"retry")

        async def passes(self: object, tenant_id: str) -> None:  # the check a moment before
            return None

        monkeypatch.setattr("pulse.streams.limits.ConnectionLimits.check", passes)
        r = await http.get(SSE_PATH, headers=auth(make_token("t1")))
        assert r.status_code == 429, (r.status_code, r.text)
        assert r.json()["error"] == "connection_limit" and r.headers["Retry-After"]


@pytest.mark.parametrize("resume", [False, True])
async def test_large_events_are_written_in_parts_of_bounded_size(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str], resume: bool
) -> None:
    """A batch of large events goes out as several writes (chunks) of at most about
    WRITE_BYTES each, live and in a replay: a client that stops reading holds one such
    write of the server's memory, not megabytes. Every event still arrives, in order."""
    from pulse.streams.live import WRITE_BYTES

    big = {f"m{i:03d}_" + "x" * 59: float(i) for i in range(200)}  # ~14 kB per event
    count = 300  # ~4.3 MB, one transaction: one delivery, one replay page
    first = (await insert_readings(pool, "t1", [("d1", {"t": 1.0})]))[0]
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    resume_from = f"Last-Event-ID: {first}\r\n" if resume else ""
    if resume:
        await insert_readings(pool, "t1", [("d1", big)] * count)
    writer.write(
        f"GET {SSE_PATH} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {make_token('t1')}\r\n"
        f"{resume_from}\r\n".encode()
    )
    sizes: list[int] = []
    ids: list[int] = []
    try:
        async with asyncio.timeout(60):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower(), head
            while len(ids) < count:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                data = await reader.readexactly(size + 2)
                sizes.append(size)
                ids += [
                    int(i)
                    for i in re.findall(rb"^id: (\d+)\ndata: {\"type\":\"telemetry\"", data, re.M)
                ]
                if not resume and data.startswith(b"retry:"):
                    await insert_readings(pool, "t1", [("d1", big)] * count)
    finally:
        writer.close()
    assert ids == list(range(first + 1, first + 1 + count))
    assert len(sizes) > 10 and max(sizes) <= WRITE_BYTES + 16 * 1024, max(sizes)
