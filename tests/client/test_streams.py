"""The reference client against a real server: typed events, filters, v2 channels, tokens."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import asyncpg
import httpx
import pytest

from pulse.client import (
    AlertsUpdate,
    AuthenticationFailed,
    FleetSummary,
    Forbidden,
    Notice,
    PulseClient,
    Telemetry,
    WebSocketTelemetryStream,
)
from pulse.client.credentials import REFRESH_MARGIN_S
from pulse.config import Settings
from tests.client.conftest import table_events
from tests.support import insert_readings, provision_device, running_server, until

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    fast = dataclasses.replace(settings, sse_keepalive_s=0.3, ws_ping_s=0.3)
    async with running_server(fast) as base:
        yield base


async def take(stream: AsyncIterator[T], n: int, timeout: float = 10) -> list[T]:
    out: list[T] = []

    async def run() -> None:
        async for item in stream:
            out.append(item)
            if len(out) >= n:
                return

    await asyncio.wait_for(run(), timeout)
    return out


def readings(
    n: int, devices: tuple[str, ...] = ("d1", "d2", "d3")
) -> list[tuple[str, dict[str, float]]]:
    return [(devices[i % len(devices)], {"temp": 20.0 + i, "hum": 40.0 + i}) for i in range(n)]


async def keep_writing(pool: asyncpg.Pool, devices: tuple[str, ...] = ("d1", "d2", "d3")) -> None:
    """A reading every 0.1 s, until cancelled."""
    while True:
        await insert_readings(pool, "t1", readings(1, devices))
        await asyncio.sleep(0.1)


async def test_sse_replays_then_streams_live_with_filters(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await insert_readings(pool, "t1", readings(30))
    async with PulseClient(url, make_token()) as client:
        stream = client.sse(device_ids=["d2"], metrics=["temp"], last_event_id=0)
        first = await take(stream, 10)
        await insert_readings(pool, "t1", readings(30))
        rest = await take(stream, 10)
        await stream.aclose()
    got = [(e.id, e.device_id, e.metrics) for e in first + rest]
    table = [(i, d, {"temp": m["temp"]}) for i, d, m in await table_events(pool, "t1") if d == "d2"]
    assert got == table
    assert all(isinstance(e, Telemetry) for e in first)
    assert stream.last_event_id == rest[-1].id and stream.duplicates_dropped == 0


async def test_websocket_filters_follow_the_client(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    connected = asyncio.Event()

    def on_notice(notice: Notice) -> None:
        if notice.kind == "connected":
            connected.set()

    async with (
        PulseClient(url, make_token(), on_notice=on_notice) as client,
        client.websocket(device_ids=["d1"]) as stream,
    ):
        iterator = aiter(stream)
        first = asyncio.create_task(take(iterator, 2))
        await asyncio.wait_for(connected.wait(), 10)
        await insert_readings(pool, "t1", readings(6))
        assert {e.device_id for e in await first} == {"d1"}
        await stream.subscribe(["d3"])
        await stream.set_metrics(["hum"])
        collected: list[Telemetry] = []

        async def collect() -> None:
            async for event in iterator:
                collected.append(event)

        collecting = asyncio.create_task(collect())
        # Both are applied once a probe of d3 arrives with its humidity only.
        async with asyncio.timeout(10):
            while not any(e.metrics == {"hum": -1.0} for e in collected):
                await insert_readings(pool, "t1", [("d3", {"temp": 1.0, "hum": -1.0})])
                with contextlib.suppress(TimeoutError):
                    await until(lambda: any(e.metrics == {"hum": -1.0} for e in collected), 0.5)
        ids = await insert_readings(pool, "t1", readings(6))
        await until(lambda: len([e for e in collected if e.id in ids]) >= 4)
        later = [e for e in collected if e.id in ids]
        collecting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await collecting
        assert stream.device_ids == {"d1", "d3"} and stream.metrics == {"hum"}
    assert [e.id for e in later] == [
        i for i, d in zip(ids, ["d1", "d2", "d3"] * 2, strict=True) if d != "d2"
    ]
    assert all(set(e.metrics) == {"hum"} for e in later)


async def test_a_filter_changed_while_connecting_is_asked_for_once_connected(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """From the client review of 7 December: a `subscribe` made while a connection was
    being made went out on no connection (the URL was built, the socket not yet kept),
    and the stream took it for done: d3's readings never came. Once connected, the
    stream now asks the server for what it wants beyond what the URL carried."""

    class Racing(WebSocketTelemetryStream):
        raced = False

        def _url(self) -> str:
            address = super()._url()
            if not self.raced:  # the change lands while the handshake is under way
                self.raced = True
                asyncio.get_running_loop().create_task(self.subscribe(["d3"]))
            return address

    async with PulseClient(url, make_token()) as client:
        stream = client._made(Racing, url, device_ids=["d1"])
        iterator = aiter(stream)
        got: list[Telemetry] = []

        async def collect() -> None:
            async for event in iterator:
                got.append(event)

        collecting = asyncio.create_task(collect())
        try:
            async with asyncio.timeout(15):
                while not any(e.device_id == "d3" for e in got):
                    await insert_readings(pool, "t1", [("d3", {"temp": 1.0})])
                    with contextlib.suppress(TimeoutError):
                        await until(lambda: any(e.device_id == "d3" for e in got), 0.5)
        finally:
            collecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collecting
            await stream.aclose()
        assert stream.raced and stream.device_ids == {"d1", "d3"}


async def test_v2_channels_yield_typed_fleet_alert_and_device_events(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    admin = {"Authorization": "Bearer " + make_token(roles=("tenant-admin",))}
    token = await provision_device(pool, "t1", "d1")
    await provision_device(pool, "t1", "d2")
    async with httpx.AsyncClient(base_url=url, headers=admin) as http:
        rule = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 30, "severity": 4}
        assert (await http.post("/api/v1/customer/alert-rules", json=rule)).status_code == 201

        async with (
            PulseClient(url, make_token()) as client,
            client.v2(fleet=True, alerts=True, device_ids=["d1"]) as v2,
        ):
            iterator = aiter(v2)
            first = await take(iterator, 2)
            assert {type(e) for e in first} == {FleetSummary, AlertsUpdate}
            summary = next(e for e in first if isinstance(e, FleetSummary))
            assert (summary.total, summary.active_alerts) == (2, 0)

            r = await http.post(
                "/ingest/v1/tenant/t1/device/d1/telemetry",
                json={"metrics": {"temp": 35.0}},
                headers={"X-Provision-Token": token},
            )
            assert r.status_code == 201
            telemetry = alerts = None
            async for event in iterator:
                if isinstance(event, Telemetry):
                    telemetry = event
                elif isinstance(event, AlertsUpdate) and event.alerts:
                    alerts = event
                if telemetry and alerts:
                    break
    assert telemetry.id == r.json()["id"] and telemetry.metrics == {"temp": 35.0}
    [alert] = alerts.alerts
    assert (alert.device_id, alert.alert_type, alert.status, alert.severity) == (
        "d1",
        "THRESHOLD",
        "OPEN",
        4,
    )


async def test_a_refused_token_is_refreshed_once(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await insert_readings(pool, "t1", readings(3))
    notices: list[Notice] = []
    refreshes = []

    async def refresh() -> str:
        refreshes.append(1)
        return make_token()

    async with PulseClient(
        url, "expired-or-garbage", refresh_token=refresh, on_notice=notices.append
    ) as client:
        for open_stream in (client.sse, client.websocket):
            events = await take(open_stream(last_event_id=0), 3)
            assert [e.id for e in events] == [1, 2, 3]
    assert refreshes == [1]  # the SSE stream refreshed; the WebSocket reused the new token
    assert [n.kind for n in notices].count("token_refreshed") == 1

    async with PulseClient(url, "garbage", refresh_token=lambda: "still-garbage") as client:
        with pytest.raises(AuthenticationFailed):
            await take(client.sse(), 1)


async def test_websocket_renews_its_token_before_expiry(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """A token 34 s from expiry (the margin is 30 s) is renewed on the open connection.

    Four seconds of slack: a token already inside the margin when the client first
    connects is refreshed before connecting, and this test would wait for nothing
    (it did, once, as the first test of a run on a slow machine, at 31 s)."""
    notices: list[Notice] = []

    def accepted() -> bool:
        return any(n.kind == "token_refreshed" and "accepted" in n.detail for n in notices)

    async with (
        PulseClient(
            url,
            make_token(lifetime_s=34),
            refresh_token=lambda: make_token(lifetime_s=3600),
            on_notice=notices.append,
        ) as client,
        client.websocket(last_event_id=0) as stream,
    ):
        writer = asyncio.create_task(keep_writing(pool))
        try:
            async for _ in stream:
                if accepted():
                    break
        finally:
            writer.cancel()
    assert stream.connections == 1


async def test_v2_sends_no_token_on_the_open_connection(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """v2 takes no token on the open connection (it would answer an error): where the
    telemetry WebSocket renews a token 34 s from expiry 4 s in, a v2 stream sends
    nothing (at the expiry the server closes 4001, and the stream reconnects with a
    fresh token as after any close)."""
    await provision_device(pool, "t1", "d1")
    notices: list[Notice] = []

    async with (
        PulseClient(
            url,
            make_token(lifetime_s=34),
            refresh_token=lambda: make_token(lifetime_s=3600),
            on_notice=notices.append,
        ) as client,
        client.v2(device_ids=["d1"]) as stream,
    ):
        writer = asyncio.create_task(keep_writing(pool, ("d1",)))
        renew_at = time.monotonic() + 34 - REFRESH_MARGIN_S
        try:
            async for _ in stream:
                if time.monotonic() > renew_at + 2:
                    break
        finally:
            writer.cancel()
    assert not [n for n in notices if n.kind in ("error", "token_refreshed")], notices
    assert stream.connections == 1


@pytest.mark.parametrize("stop", ["aclose", "cancel"])
async def test_a_websocket_stopped_in_the_middle_of_a_replay_lets_go_at_once(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str], stop: str
) -> None:
    """No closing handshake behind thousands of queued events: it waited close_timeout
    for a close frame that the paused reading (the queue is full) would not get to.
    The close timeout is made 30 s here, so that a wait for it stands out from a busy
    machine's slowness (an abort took 1.3 s beside two CPU-bound processes)."""
    for _ in range(5):
        await insert_readings(pool, "t1", readings(1000))
    async with PulseClient(url, make_token()) as client:
        stream = client.websocket(last_event_id=0)
        stream.close_timeout_s = 30.0
        received = asyncio.Event()
        reader = asyncio.create_task(read(stream, 100, received, hold=stop == "aclose"))
        await asyncio.wait_for(received.wait(), 10)
        started = time.monotonic()
        if stop == "aclose":
            await stream.aclose()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        assert time.monotonic() - started < 10.0
        assert stream.last_event_id is not None and stream.last_event_id < 5000


async def read(
    stream: WebSocketTelemetryStream, n: int, received: asyncio.Event, *, hold: bool
) -> None:
    """Read events, telling ``received`` after ``n``; ``hold``: then stop reading."""
    async with stream:
        async for _ in stream:
            n -= 1
            if n == 0:
                received.set()
                if hold:
                    await asyncio.Event().wait()


async def test_rest_helpers(url: str, pool: asyncpg.Pool, make_token: Callable[..., str]) -> None:
    await provision_device(pool, "t1", "d1")
    async with PulseClient(url, make_token()) as client:
        summary = await client.fleet_summary()
        assert summary.total == 1 and summary.offline == 1
        assert await client.alerts() == []
        with pytest.raises(Forbidden):  # acknowledging needs tenant-admin
            await client.acknowledge_alert(1)
    async with PulseClient(url, "garbage") as client:
        with pytest.raises(AuthenticationFailed):
            await client.fleet_summary()


async def test_alerts_come_from_every_page_and_changes_return_the_alert(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    admin = make_token(roles=("tenant-admin",), subject="ops-1")
    devices = [f"d{i:02}" for i in range(60)]  # more than the server's page of 50
    tokens = {device: await provision_device(pool, "t1", device) for device in devices}
    rule = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 30, "severity": 4}
    hot = [
        {"tenant_id": "t1", "device_id": d, "provision_token": t, "metrics": {"temp": 35.0}}
        for d, t in tokens.items()
    ]
    async with httpx.AsyncClient(base_url=url) as http:
        headers = {"Authorization": f"Bearer {admin}"}
        r = await http.post("/api/v1/customer/alert-rules", json=rule, headers=headers)
        assert r.status_code == 201
        r = await http.post("/ingest/v1/batch", json={"messages": hot})
        assert r.json()["accepted"] == 60

    async with PulseClient(url, admin) as client:
        active = await client.alerts()
        assert sorted(a.device_id or "" for a in active) == devices
        ids = [a.alert_id for a in active]
        assert ids == sorted(ids, reverse=True)  # newest first
        assert [a.alert_id for a in await client.alerts(page_size=7)] == ids
        assert [a.alert_id async for a in client.iter_alerts(page_size=25)] == ids

        acknowledged = await client.acknowledge_alert(ids[0])
        assert (acknowledged.alert_id, acknowledged.status) == (ids[0], "ACKNOWLEDGED")
        assert acknowledged.details["acknowledged_by"] == "ops-1"
        closed = await client.close_alert(ids[1])
        assert (closed.alert_id, closed.status) == (ids[1], "CLOSED")
        assert closed.details["closed_by"] == "ops-1"

        assert [a.alert_id for a in await client.alerts(page_size=10)] == [ids[0], *ids[2:]]
        assert [a.alert_id for a in await client.alerts("CLOSED")] == [ids[1]]
        assert len(await client.alerts(None)) == 60


async def test_closing_the_client_ends_its_streams_and_stop_ends_one_from_anywhere(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """From the client audit: PulseClient.aclose() left WebSocket streams reconnecting,
    and made an SSE consumer fail with "the client has been closed"; a stream could not
    be ended from another task (aclose: "generator is already running")."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")

    async def consume(stream: AsyncIterator[object]) -> int:
        seen = 0
        async for _ in stream:
            seen += 1
        return seen

    client = PulseClient(url, make_token("t1"))
    streams = [client.sse(), client.websocket(), client.v2(fleet=True)]
    consumers = [asyncio.create_task(consume(s)) for s in streams]
    await until(lambda: all(s.connections for s in streams))
    lone = client.websocket()
    alone = asyncio.create_task(consume(lone))
    await until(lambda: lone.connections == 1)
    lone.stop()  # from this task, while another iterates it
    async with asyncio.timeout(10):
        assert await alone == 0
    await client.aclose()
    async with asyncio.timeout(30):  # an SSE stream ends at its next keepalive at most
        seen = await asyncio.gather(*consumers)  # each iteration ended, none raised
    assert seen[:2] == [0, 0]  # no reading was sent (v2 pushes its fleet summary)


async def test_a_v2_stream_refused_after_its_handshake_backs_off(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server accepts every v2 handshake and only then refuses (1011
    database_unavailable in an outage, 4029 at the tenant's limit). The stream counted the
    handshake as a connection and reset its backoff before each refusal, so it
    reconnected within 0.5 s for as long as the outage lasted (80 times in 30 s): now it
    is connected at the server's answer to a subscription, and backs off until then."""
    from pulse.db.errors import DatabaseUnavailable
    from pulse.streams.limits import ConnectionLimits

    @contextlib.asynccontextmanager
    async def unavailable(*_args: object, **_kw: object) -> AsyncIterator[None]:
        raise DatabaseUnavailable("[Errno 111] Connection refused")
        yield

    notices: list[Notice] = []
    async with PulseClient(
        url, make_token(), on_notice=notices.append, backoff_base_s=0.05, backoff_cap_s=2
    ) as client:
        stream = client.v2(fleet=True)
        with monkeypatch.context() as patch:
            patch.setattr(ConnectionLimits, "hold", unavailable)
            reader = asyncio.create_task(take(stream, 1, timeout=30))
            await until(lambda: [n.kind for n in notices].count("disconnected") >= 5)
            # At HEAD: a "connected" before each refusal, and the backoff at 1 each time.
            assert [n.kind for n in notices] == ["disconnected"] * len(notices), notices
            assert all("1011 database_unavailable" in n.detail for n in notices), notices
            assert stream.backoff.attempt >= 5  # delays doubling: 0.05 s, 0.1 s, ... 2 s
        # Once the server answers, the stream is connected and its backoff starts over.
        [summary] = await reader
        assert isinstance(summary, FleetSummary)
        assert stream.connections == 1 and stream.backoff.attempt == 0


async def test_a_v2_stream_whose_only_subscription_is_refused_is_connected(
    url: str, make_token: Callable[..., str]
) -> None:
    """From the review of the fix above: a v2 stream counted as connected only at a
    `subscribed` or `fleet_summary`, so one whose subscriptions were all answered with
    `error` (a device id not valid here) never said `connected` and never reset its
    backoff. Any message is the server's acceptance: its refusals are closes."""
    notices: list[Notice] = []
    async with PulseClient(url, make_token(), on_notice=notices.append) as client:
        stream = client.v2(device_ids=["not a valid id!"])
        reader = asyncio.create_task(take(stream, 1, timeout=30))
        try:
            await until(lambda: any(n.kind == "connected" for n in notices))
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    assert stream.connections == 1
