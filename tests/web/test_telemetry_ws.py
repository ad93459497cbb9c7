"""The telemetry WebSocket (CONTRACT 5.1) with real clients against a real server."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
from websockets.asyncio.client import connect

from pulse.config import Settings
from tests.streams.ws_support import WS_PATH, closed, open_ws, recv, recv_raw, request, ws_url
from tests.support import deeply_nested_token, insert_readings, running_server

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    fast = dataclasses.replace(settings, ws_ping_s=0.3, listener_backoff_max_s=0.3)
    async with running_server(fast) as base:
        yield base


def iso(text: str) -> datetime:
    assert text.endswith("Z") and len(text) == 24, text
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


async def next_telemetry(ws: object, timeout: float = 5) -> dict[str, object]:
    while True:
        message = await recv(ws, timeout)  # type: ignore[arg-type]
        if message["type"] == "telemetry":
            return message  # type: ignore[no-any-return]


async def test_connected_then_replay_then_live_byte_for_byte(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await insert_readings(pool, "t1", [("d1", {"temp": 21.5}), ("d2", {"hum": 40})])
    async with open_ws(url, token=make_token("t1"), last_event_id=0) as ws:
        assert json.loads(await recv_raw(ws)) == {
            "type": "connected",
            "tenant_id": "t1",
            "filters": {"device_ids": [], "metrics": []},
            "last_event_id": 2,
        }
        first = await recv_raw(ws)
        assert first.startswith('{"type":"telemetry","id":1,"device_id":"d1","data":{"time":"')
        assert first.endswith('","metrics":{"temp": 21.5}}}') or first.endswith(
            '","metrics":{"temp":21.5}}}'
        )
        event = json.loads(first)
        assert set(event) == {"type", "id", "device_id", "data"}
        assert set(event["data"]) == {"time", "metrics"}
        iso(event["data"]["time"])
        assert json.loads(await recv_raw(ws))["id"] == 2
        (live,) = await insert_readings(pool, "t1", [("d3", {"temp": 1})])
        assert (await next_telemetry(ws))["id"] == live

    # Filters from the query; no last_event_id: live only.
    async with open_ws(url, token=make_token("t1"), device_id="d2,d1", metric="temp") as ws:
        assert await recv(ws) == {
            "type": "connected",
            "tenant_id": "t1",
            "filters": {"device_ids": ["d1", "d2"], "metrics": ["temp"]},
            "last_event_id": 3,
        }
        ids = await insert_readings(
            pool, "t1", [("d2", {"hum": 1}), ("d3", {"temp": 2}), ("d1", {"temp": 3, "hum": 4})]
        )
        event = await next_telemetry(ws)
        assert event["id"] == ids[2]
        assert event["data"]["metrics"] == {"temp": 3}  # type: ignore[index]


async def test_every_action_and_its_reply(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    async with open_ws(url, token=make_token("t1")) as ws:
        assert (await recv(ws))["type"] == "connected"
        assert await request(ws, {"action": "ping"}) == {"type": "pong"}
        assert await request(ws, {"action": "subscribe", "device_id": "d1"}) == {
            "type": "subscribed",
            "device_ids": ["d1"],
        }
        assert await request(ws, {"action": "subscribe", "device_ids": ["d2", "d3", "d2"]}) == {
            "type": "subscribed",
            "device_ids": ["d2", "d3"],
        }
        assert await request(ws, {"action": "unsubscribe", "device_ids": ["d2", "d3"]}) == {
            "type": "unsubscribed",
            "device_ids": ["d2", "d3"],
        }
        ids = await insert_readings(pool, "t1", [("d2", {"a": 1}), ("d1", {"a": 2})])
        assert (await next_telemetry(ws))["id"] == ids[1]  # only d1 now

        assert await request(ws, {"action": "set_metrics", "metrics": ["b", "a"]}) == {
            "type": "metrics_updated",
            "metrics": ["b", "a"],
        }
        ids = await insert_readings(pool, "t1", [("d1", {"c": 1}), ("d1", {"a": 3, "c": 2})])
        event = await next_telemetry(ws)
        assert event["id"] == ids[1] and event["data"]["metrics"] == {"a": 3}  # type: ignore[index]

        # Unsubscribing the last device leaves no device, not every device.
        assert await request(ws, {"action": "unsubscribe", "device_id": "d1"}) == {
            "type": "unsubscribed",
            "device_ids": ["d1"],
        }
        skipped = await insert_readings(pool, "t1", [("d1", {"a": 4}), ("d2", {"a": 5})])
        ping = await recv(ws)
        while ping["last_event_id"] < skipped[-1]:  # pings until the skipped ids have passed
            assert ping["type"] == "ping", ping
            ping = await recv(ws)
        assert ping["type"] == "ping" and ping["last_event_id"] == skipped[-1]

        assert await request(ws, {"action": "clear_filters"}) == {"type": "filters_cleared"}
        ids = await insert_readings(pool, "t1", [("d9", {"z": 1})])
        event = await next_telemetry(ws)
        assert event["id"] == ids[0] and event["data"]["metrics"] == {"z": 1}  # type: ignore[index]

        fresh = make_token("t1", lifetime_s=7200)
        reply = await request(ws, {"action": "auth", "token": fresh})
        assert set(reply) == {"type", "expires_at"} and reply["type"] == "auth_ok"
        assert abs(iso(reply["expires_at"]).timestamp() - (time.time() + 7200)) < 5

        assert await request(ws, {"action": "set_metrics", "metrics": []}) == {
            "type": "metrics_updated",
            "metrics": [],
        }


async def test_a_burst_of_messages_is_answered_in_order(
    url: str, make_token: Callable[..., str]
) -> None:
    """200 messages sent before any answer is read: the handler reads them from
    hypercorn's bounded queue as it goes (the client is held back by TCP while it
    is full), and every one is answered, in order; then the connection is normal."""
    async with open_ws(url, token=make_token("t1")) as ws:
        await recv(ws)
        count = 200
        for i in range(count):
            await ws.send(orjson.dumps({"action": "subscribe", "device_id": f"d{i}"}).decode())
        for i in range(count):
            reply = await recv(ws)
            assert reply["type"] == "subscribed" and reply["device_ids"][-1] == f"d{i}", reply
        assert await request(ws, {"action": "ping"}) == {"type": "pong"}


async def test_bad_input_gets_an_error_and_the_connection_stays(
    url: str, make_token: Callable[..., str]
) -> None:
    async with open_ws(url, token=make_token("t1")) as ws:
        await recv(ws)
        for message in [
            "not json",
            "[1, 2]",
            "42",
            '"text"',
            "{}",
            '{"action": "dance"}',
            '{"action": 7}',
            '{"action": "subscribe"}',
            '{"action": "subscribe", "device_id": "bad id"}',
            '{"action": "subscribe", "device_ids": "d1"}',
            '{"action": "subscribe", "device_ids": [1]}',
            '{"action": "unsubscribe", "device_id": "d1"}',  # streams every device
            '{"action": "set_metrics"}',
            '{"action": "set_metrics", "metrics": ["x y"]}',
            '{"action": "auth"}',
            '{"action": "auth", "token": "nope"}',
            '{"action": "auth", "token": "' + make_token("t2") + '"}',
            '{"action": "auth", "token": "' + make_token("t1", roles=()) + '"}',
            # Expired, if within the verifier's leeway: taken, it would close at once.
            '{"action": "auth", "token": "' + make_token("t1", lifetime_s=-10) + '"}',
            # Signed, with claims nested deeper than joserfc's json can read: it was a 1011.
            '{"action": "auth", "token": "' + deeply_nested_token(5000) + '"}',
            b'{"action": "ping"}',
            b"",  # an empty binary frame: a 1011 and a traceback, from the security audit
        ]:
            reply = await request(ws, message)
            assert set(reply) == {"type", "message"} and reply["type"] == "error", (message, reply)
            assert reply["message"].endswith("."), reply
        assert await request(ws, {"action": "ping"}) == {"type": "pong"}


async def test_idle_ping_carries_the_newest_passed_id(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    async with open_ws(url, token=make_token("t1"), device_id="d9") as ws:
        await recv(ws)
        first = await recv(ws)
        assert set(first) == {"type", "time", "last_event_id"}
        assert first["type"] == "ping" and first["last_event_id"] == 0
        assert abs(iso(first["time"]).timestamp() - time.time()) < 5
        ids = await insert_readings(pool, "t1", [("d1", {"a": 1}), ("d2", {"a": 2})])
        ping = await recv(ws)
        while ping["last_event_id"] != ids[-1]:
            ping = await recv(ws)
        assert ping["type"] == "ping"


async def test_token_expiry_closes_4001_unless_refreshed(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    started = time.monotonic()
    async with open_ws(url, token=make_token("t1", lifetime_s=3)) as ws:
        await recv(ws)
        assert await closed(ws) == (4001, "token_expired")
    assert time.monotonic() - started < 8

    # exp is a whole second: a token lasts up to a second less than asked. The waits
    # below go by the tokens' own exp, with seconds to spare on a busy machine.
    first = make_token("t1", lifetime_s=3)
    async with open_ws(url, token=first) as ws:
        await recv(ws)
        refreshed = make_token("t1", lifetime_s=8)
        reply = await request(ws, {"action": "auth", "token": refreshed})
        assert reply["type"] == "auth_ok"
        await asyncio.sleep(max(0.0, expiry(first) + 0.5 - time.time()))  # past the first
        assert await request(ws, {"action": "ping"}) == {"type": "pong"}
        assert await closed(ws) == (4001, "token_expired")
    assert time.time() > expiry(refreshed) - 0.1  # the refreshed token held it open till its exp


def expiry(token: str) -> float:
    """A JWT's exp claim (read, not verified)."""
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


async def test_tenant_isolation_and_operators(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    operator = make_token(None, roles=("operator",))
    async with (
        open_ws(url, token=make_token("tb")) as b,
        open_ws(url, token=operator, tenant_id="ta") as op,
    ):
        assert (await recv(b))["tenant_id"] == "tb"
        assert (await recv(op))["tenant_id"] == "ta"
        await insert_readings(pool, "ta", [("d1", {"secret": 1})])
        (b_id,) = await insert_readings(pool, "tb", [("d1", {"b": 1})])
        assert (await next_telemetry(op))["data"]["metrics"] == {"secret": 1}  # type: ignore[index]
        event = await next_telemetry(b)
        assert event["id"] == b_id and event["data"]["metrics"] == {"b": 1}  # type: ignore[index]
        # An operator's auth refresh must keep the same tenant (the connection's tenant_id).
        assert (await request(op, {"action": "auth", "token": operator}))["type"] == "auth_ok"


async def test_compression_offered_by_the_client_is_refused(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    # `websockets` offers permessage-deflate, as browsers do; accepting it would
    # cost each connection a zlib state (~100 KiB) and a compression per message.
    for path, action, answer in [
        ("/api/v1/customer/telemetry/stream", {"action": "ping"}, "pong"),
        ("/api/v2/ws", {"action": "subscribe", "type": "alerts"}, "subscribed"),
    ]:
        async with open_ws(url, path, token=make_token("t1")) as ws:
            assert ws.request is not None and ws.response is not None
            assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            assert ws.protocol.extensions == []
            while (reply := await request(ws, action))["type"] == "connected":
                pass
            assert reply["type"] == answer  # plain frames both ways


@pytest.mark.parametrize("path", ["/api/v1/customer/telemetry/stream", "/api/v2/ws"])
async def test_a_cookie_that_is_no_utf8_does_not_break_the_handshake(
    url: str, make_token: Callable[..., str], path: str
) -> None:
    """Another site's cookie with a latin-1 byte (browsers send the bytes as set) used to
    make every WebSocket of that browser fail with 1011 and a traceback."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        key = base64.b64encode(b"0123456789abcdef")
        writer.write(
            b"GET %s?token=%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n"
            b"Cookie: legacy_pref=caf\xe9; theme=dark\r\n\r\n"
            % (path.encode(), make_token("t1").encode(), key)
        )
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            if path == "/api/v2/ws":  # v2 speaks when spoken to: a message it answers
                message = b'{"action":"wave"}'
                writer.write(b"\x81%c" % (0x80 | len(message)) + bytes(4) + message)  # mask 0
            opcode, length = await reader.readexactly(2)
            assert opcode == 0x81, (opcode, length)  # a text frame, not a close
            if length == 126:
                length = int.from_bytes(await reader.readexactly(2))
            frame = json.loads(await reader.readexactly(length))
            assert frame["type"] == ("connected" if path != "/api/v2/ws" else "error"), frame
    finally:
        writer.close()


async def test_a_parameter_given_twice_is_one_comma_separated_list(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """As HTTP libraries send a list (its first value used to be taken, the rest ignored)."""
    await insert_readings(pool, "t1", [("d1", {"a": 1})])
    twice = "&device_id=d1&device_id=d2&metric=a&metric=b"
    async with connect(ws_url(url, WS_PATH, token=make_token("t1")) + twice) as ws:
        connected = await recv(ws)
        assert connected["filters"] == {"device_ids": ["d1", "d2"], "metrics": ["a", "b"]}
    # A single value given twice is no position.
    async with connect(
        ws_url(url, WS_PATH, token=make_token("t1"), last_event_id=0) + "&last_event_id=1"
    ) as ws:
        assert await closed(ws) == (4000, "invalid_parameter")


async def test_a_new_websocket_held_by_a_lock_on_tenants_is_closed_unavailable_in_time(
    url: str,
    pool: asyncpg.Pool,
    database_url: str,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the operations audit: under a 30 s lock on `tenants` (the database still
    answering) a new WebSocket waited 26.5 s for its `connected` message, unbounded,
    where ingest gives up after 10 s. Now the read of the tenant's newest id has that
    budget (shortened here), then the connection is closed 1011 database_unavailable,
    for the client to reconnect and resume."""
    monkeypatch.setattr("pulse.bus.store.NEWEST_WAIT_S", 0.5)
    await insert_readings(pool, "t1", [("d1", {"a": 1})])
    # On a connection of its own: a pooled one idle in its transaction is ended after 15 s.
    locker = await asyncpg.connect(database_url)
    lock = locker.transaction()
    await lock.start()
    await locker.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
    try:
        async with open_ws(url, token=make_token("t1")) as ws:
            assert await closed(ws, timeout=20) == (1011, "database_unavailable")
    finally:
        await lock.rollback()
        await locker.close()
    async with open_ws(url, token=make_token("t1")) as ws:  # the lock gone: served again
        assert (await recv(ws))["type"] == "connected"
