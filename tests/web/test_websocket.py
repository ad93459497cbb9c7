"""Every WebSocket close code of CONTRACT section 5, provoked on both WebSockets.

After each, the server counts no connection: not in the status endpoint, not
in the cluster-wide table.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import orjson
import pytest
from websockets.asyncio.client import connect

from pulse.bus import hub
from pulse.config import Settings
from pulse.db.errors import DatabaseUnavailable
from pulse.streams.messages import INVALID_UTF8_REASON, MESSAGE_TOO_BIG_REASON
from tests.streams.sse_client import SSE_PATH
from tests.streams.ws_support import (
    V2_PATH,
    WS_PATH,
    close_of,
    closed,
    connection_count,
    masked_text,
    open_ws,
    raw_ws,
    read_frame,
    recv,
    request,
    until_no_connections,
    ws_url,
)
from tests.support import insert_readings, running_server, until

pytestmark = pytest.mark.timeout(90)

BOTH = pytest.mark.parametrize("path", [WS_PATH, V2_PATH])


@pytest.fixture
async def url(settings: Settings) -> object:
    async with running_server(dataclasses.replace(settings, ws_ping_s=0.3)) as base:
        yield base


async def first_message(base: str, path: str, **params: str) -> dict[str, object]:
    async with open_ws(base, path, **params) as ws:
        if path == V2_PATH:
            return await request(ws, {"action": "subscribe", "type": "fleet"})  # type: ignore[no-any-return]
        return await recv(ws)  # type: ignore[no-any-return]


@BOTH
async def test_auth_and_parameter_failures(
    url: str, path: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    t1 = make_token("t1")
    cases: list[tuple[dict[str, str], tuple[int, str]]] = [
        ({}, (4001, "missing_token")),
        ({"token": "not-a-jwt"}, (4001, "invalid_token")),
        ({"token": make_token("t1", lifetime_s=-120)}, (4001, "token_expired")),
        ({"ticket": "pst_never-issued"}, (4001, "invalid_ticket")),
        ({"token": make_token("t1", exp=10**20)}, (4001, "invalid_token")),
        ({"token": make_token("t1", subject="a\u0000b")}, (4001, "invalid_token")),
        ({"token": t1, "tenant_id": "t2"}, (4003, "forbidden")),
        ({"token": make_token("t1", roles=())}, (4003, "forbidden")),
        ({"token": t1, "tenant_id": "bad id!"}, (4000, "invalid_tenant_id")),
    ]
    if path == WS_PATH:
        cases += [
            ({"token": make_token(None, roles=("operator",))}, (4000, "tenant_required")),
            ({"token": t1, "last_event_id": "-1"}, (4000, "invalid_parameter")),
            ({"token": t1, "last_event_id": "\u00b2"}, (4000, "invalid_parameter")),
            ({"token": t1, "last_event_id": "\u0663"}, (4000, "invalid_parameter")),
            ({"token": t1, "device_id": "bad id"}, (4000, "invalid_parameter")),
            ({"token": t1, "metric": "a,b c"}, (4000, "invalid_parameter")),
        ]
    for params, expected in cases:
        assert await close_of(url, path, **params) == expected, params
    await until_no_connections(url, pool)


@BOTH
async def test_origin_is_enforced(
    settings: Settings, path: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    allowed = dataclasses.replace(settings, allowed_origins=("https://app.example",))
    token = make_token("t1")
    async with running_server(allowed) as base:
        evil = {"Origin": "https://evil.example"}
        assert await close_of(base, path, headers=evil, token=token) == (
            4003,
            "origin_not_allowed",
        )
        good = {"Origin": "https://app.example"}
        async with open_ws(base, path, headers=good, token=token) as ws:
            if path == WS_PATH:
                assert (await recv(ws))["type"] == "connected"
            else:
                assert (await request(ws, {"action": "subscribe", "type": "alerts"}))["type"]
        # Not from a browser page (no Origin): allowed.
        async with open_ws(base, path, token=token) as ws:
            await request(ws, '{"action": "ping"}')
        await until_no_connections(base, pool)


async def test_connection_limits_count_websockets_and_sse_together(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    limited = dataclasses.replace(settings, max_connections_per_tenant=3, max_connections=4)
    t1 = make_token("t1")
    async with (
        running_server(limited) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as http,
        http.stream("GET", SSE_PATH, headers={"Authorization": f"Bearer {t1}"}) as sse,
        open_ws(base, WS_PATH, token=t1) as ws,
        open_ws(base, V2_PATH, token=t1) as v2,
    ):
        await recv(ws)
        await request(v2, {"action": "subscribe", "type": "fleet"})
        sse_body = sse.aiter_bytes()  # kept: dropping the iterator would close the stream
        await sse_body.__anext__()
        assert await connection_count(base) == {
            "total": 3,
            "websocket": 1,
            "sse": 1,
            "legacy_v2": 1,
        }
        for path in (WS_PATH, V2_PATH):
            assert await close_of(base, path, token=t1) == (4029, "connection_limit")
        r = await http.get(SSE_PATH, headers={"Authorization": f"Bearer {t1}"})
        assert r.status_code == 429
        # Another tenant still has room on this process: one more, then the process is full.
        async with open_ws(base, WS_PATH, token=make_token("t2")) as other:
            await recv(other)
            assert await close_of(base, V2_PATH, token=make_token("t3")) == (
                4029,
                "connection_limit",
            )
    async with running_server(limited) as base:
        await until_no_connections(base, pool)


@BOTH
async def test_after_its_1009_close_the_server_sends_nothing_and_frees_the_slot(
    url: str, path: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """hypercorn closes by itself on a message over the limit, and told the app nothing:
    the stream went on writing events and pings after the Close frame (RFC 6455 5.5.1:
    none may follow it), and held its connection slot, until the client answered the
    close. This client never answers it."""
    await insert_readings(pool, "t1", [("d1", {"a": 1})])
    async with raw_ws(url, path, make_token("t1")) as (reader, writer):
        async with asyncio.timeout(20):
            if path == V2_PATH:
                subscribe = b'{"action":"subscribe","type":"device","device_id":"d1"}'
                writer.write(masked_text(subscribe))
            await read_frame(reader)  # connected, or subscribed
            writer.write(masked_text(b"x" * 100_000))
            while (frame := await read_frame(reader))[0] != 0x8:
                pass  # what was on its way before the close
            assert frame[1] == (1009).to_bytes(2) + MESSAGE_TOO_BIG_REASON.encode(), frame
            await insert_readings(pool, "t1", [("d1", {"a": 2})] * 3)
            after = await reader.read()  # until the server ends the connection
        assert after == b"", after[:200]
        await until_no_connections(url, pool)


@BOTH
async def test_message_too_big_closes_1009(
    url: str, path: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    token = make_token("t1")
    # hypercorn closes for the first and the last (over its limit, which counts the
    # characters of a text frame), the app for the second (17,000 characters, 68,000
    # bytes): the same reason, which was empty from hypercorn.
    for frame in ["x" * (64 * 1024 + 1), "😀" * 17_000, b"\x00" * (64 * 1024 + 1)]:
        async with open_ws(url, path, token=token) as ws:
            if path == WS_PATH:
                await recv(ws)
            await ws.send(frame)
            assert await closed(ws) == (1009, "Messages are limited to 65536 bytes.")
    # At the limit: an answer, and the connection stays.
    async with open_ws(url, path, token=token) as ws:
        if path == WS_PATH:
            await recv(ws)
        reply = await request(ws, "x" * (64 * 1024))
        assert reply["type"] == "error"
        reply = await request(ws, '{"action": "' + "é" * 30_000 + '"}')
        assert reply["type"] == "error"
    await until_no_connections(url, pool)


@BOTH
async def test_invalid_utf8_closes_1007(
    url: str, path: str, make_token: Callable[..., str]
) -> None:
    """Not JSON at all: the frame breaks RFC 6455, which requires failing the connection.
    The close still comes as a close frame with the RFC's code, not a dropped socket."""
    async with open_ws(url, path, token=make_token("t1")) as ws:
        if path == WS_PATH:
            await recv(ws)
        await ws.send(b'{"action": "\xff\xfe"}', text=True)
        # The reason was wsproto's UnicodeDecodeError text ("'utf-8' codec can't ...").
        assert await closed(ws) == (1007, INVALID_UTF8_REASON)
    await until_no_connections(url)


@BOTH
async def test_an_invalid_close_reason_closes_1007_with_the_same_reason(
    url: str, path: str, make_token: Callable[..., str]
) -> None:
    """A close frame whose reason is not UTF-8 (no client library sends one): wsproto's
    1007 said "Error decoding CLOSE reason: 'utf-8' codec can't decode ..."."""
    async with raw_ws(url, path, make_token("t1")) as (reader, writer):
        async with asyncio.timeout(20):
            if path == WS_PATH:
                await read_frame(reader)  # connected
            writer.write(masked_text((1000).to_bytes(2) + b"bye \xff", opcode=0x8))
            while (frame := await read_frame(reader))[0] != 0x8:
                pass
        assert frame[1] == (1007).to_bytes(2) + INVALID_UTF8_REASON.encode()
        assert len(frame[1]) <= 125  # a control frame's payload: a reason of 123 bytes
    await until_no_connections(url)


@BOTH
async def test_a_normal_close_is_answered_1000(
    url: str, path: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    async with open_ws(url, path, token=make_token("t1")) as ws:
        if path == WS_PATH:
            await recv(ws)
        await ws.close(1000, "bye")
        assert ws.close_code == 1000
    await until_no_connections(url, pool)


@BOTH
async def test_a_client_that_vanishes_without_a_close_frame_is_counted_out(
    url: str, path: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """The handler learns of the disconnect from its own read (no task of Quart's
    watches for it) and ends: the connection is released everywhere."""
    async with open_ws(url, path, token=make_token("t1")) as ws:
        if path == WS_PATH:
            await recv(ws)
        else:
            await request(ws, {"action": "subscribe", "type": "fleet"})
        assert (await connection_count(url))["total"] == 1
        ws.transport.abort()  # a reset: no close frame, no closing handshake
    await until_no_connections(url, pool)


@BOTH
async def test_internal_errors_close_1011(
    url: str,
    path: str,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pulse.bus.store import EventStore

    async def unreachable(*_args: object, **_kw: object) -> int:
        raise DatabaseUnavailable("connection refused")

    async def broken(*_args: object, **_kw: object) -> int:
        raise RuntimeError("a bug")

    await insert_readings(pool, "t1", [("d1", {"a": 1})])
    for fake, reason in ((unreachable, "database_unavailable"), (broken, "internal_error")):
        with monkeypatch.context() as patch:
            if path == WS_PATH:
                patch.setattr(EventStore, "newest_id", fake)
                assert await close_of(url, path, token=make_token("t1")) == (1011, reason)
            else:
                patch.setattr("pulse.streams.legacy_v2.reads.fleet_summary", fake)
                async with open_ws(url, path, token=make_token("t1")) as ws:
                    await ws.send('{"action": "subscribe", "type": "fleet"}')
                    assert await closed(ws) == (1011, reason)
    await until_no_connections(url, pool)


async def test_websockets_refused_in_an_outage_are_logged_once_per_ten_seconds_per_kind(
    url: str,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each WebSocket closed 1011 database_unavailable wrote a WARNING of its own: 165
    lines in a 30 s outage from two reconnecting v2 clients, where operations.md promises
    an outage a line per ten seconds per kind. Now one line for each kind of WebSocket."""
    from collections import defaultdict

    from pulse.logs import Throttled
    from pulse.streams.limits import ConnectionLimits
    from pulse.web import websocket

    @contextlib.asynccontextmanager
    async def unavailable(*_args: object, **_kw: object) -> AsyncIterator[None]:
        raise DatabaseUnavailable("[Errno 111] Connection refused")
        yield

    monkeypatch.setattr(ConnectionLimits, "hold", unavailable)
    # Fresh: what an earlier test logged does not count against this one.
    fresh: defaultdict[str, Throttled] = defaultdict(lambda: Throttled(websocket.log))
    monkeypatch.setattr(websocket, "_UNAVAILABLE", fresh, raising=False)
    caplog.set_level(logging.WARNING, logger="pulse.web.websocket")
    for path in (V2_PATH, WS_PATH) * 3:
        assert await close_of(url, path, token=make_token("t1")) == (1011, "database_unavailable")
    lines = [r.getMessage() for r in caplog.records if r.name == "pulse.web.websocket"]
    assert sorted(line.split(":")[0] for line in lines) == [
        "closing a legacy_v2 WebSocket",
        "closing a websocket WebSocket",
    ], lines


@BOTH
async def test_server_restart_closes_1012(
    settings: Settings, path: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        base = await stack.enter_async_context(running_server(settings))
        async with open_ws(base, path, token=make_token("t1")) as ws:
            if path == WS_PATH:
                await recv(ws)
            else:
                await request(ws, {"action": "subscribe", "type": "alerts"})
            stopping = asyncio.create_task(stack.aclose())
            assert await closed(ws) == (1012, "server_restarting")
            await stopping
    assert await pool.fetchval("SELECT count(*) FROM stream_connections") == 0


# The hub's grace for a stream that stops reading, in the 4008 test: long, so that the
# slow client is cut for lagging when it reads, not dropped for reading nothing.
GRACE_S = 60.0


@BOTH
async def test_a_client_that_stops_reading_is_closed_4008(
    settings: Settings,
    path: str,
    pool: asyncpg.Pool,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The slow client reads what was buffered only after the fast one is done: on a
    # loaded machine that may be past the grace, after which an unread connection
    # is dropped (tests/serving/test_direct.py).
    monkeypatch.setattr(hub, "LAGGING_GRACE_S", GRACE_S)
    small = dataclasses.replace(settings, queue_size=200, ws_ping_s=0.3)
    async with running_server(small) as base:
        await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
        token = make_token("t1")
        # A fixed receive buffer and a client that buffers one message: what it does
        # not read backs up into the server.
        sock = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
        async with (
            connect(
                ws_url(base, path, token=token),
                sock=sock,
                max_queue=1,
                max_size=None,
                compression=None,  # repetitive events would compress to nothing
            ) as slow,
            open_ws(base, path, token=token) as fast,
        ):
            for ws in (slow, fast):
                if path == WS_PATH:
                    await recv(ws)
                else:
                    await request(ws, {"action": "subscribe", "type": "device", "device_id": "d1"})
            fast_ids: list[int] = []

            async def read_fast() -> None:
                while len(fast_ids) < 2000:
                    message = await recv(fast)
                    if message["type"] == "telemetry":
                        fast_ids.append(message["id"])

            reader = asyncio.create_task(read_fast())
            big = {f"m{i:03d}": float(i) for i in range(200)}  # ~4.5 kB per event
            for _ in range(40):
                last = (await insert_readings(pool, "t1", [("d1", big)] * 50))[-1]
                # Each commit delivered before the next: a listener that fell behind
                # would publish several at once, more than a queue holds, and cut the
                # fast client as lagging too.
                await until(lambda last=last: bool(fast_ids) and fast_ids[-1] >= last, 10)
            await asyncio.wait_for(reader, 30)
            assert fast_ids == list(range(1, 2001))
            reading = time.monotonic()
            got: list[int] = []
            code, reason = None, None
            with contextlib.suppress(Exception):
                while True:
                    message = await recv(slow, timeout=20)
                    if message["type"] == "telemetry":
                        got.append(message["id"])
            code, reason = slow.close_code, slow.close_reason
            assert (code, reason) == (4008, "lagging")
            # Promptly, once it reads: not only when the hub gives up on a stuck stream.
            assert time.monotonic() - reading < GRACE_S / 3
            assert got == list(range(1, len(got) + 1)) and len(got) < 2000
        if path == WS_PATH:
            # It resumes from its last id with nothing lost.
            async with open_ws(base, path, token=token, last_event_id=got[-1]) as again:
                await recv(again)
                rest = [(await recv(again))["id"] for _ in range(2000 - len(got))]
                assert got + rest == list(range(1, 2001))
        async with httpx.AsyncClient(base_url=base) as http:
            metrics = (await http.get("/metrics")).text
        kind = "websocket" if path == WS_PATH else "legacy_v2"
        assert f'pulse_lagging_disconnects_total{{kind="{kind}"}} 1.0' in metrics
        await until_no_connections(base, pool)


@BOTH
async def test_a_cookie_streams_only_to_the_servers_own_pages_by_default(
    url: str, path: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """From the security audit: without PULSE_ALLOWED_ORIGINS any site's page could open
    a stream with a visitor's pulse_session cookie (browsers send it with cross-site
    handshakes) and read the tenant's telemetry and alerts. The cookie now streams to
    the server's own pages only, as it makes changes; a token or ticket in the URL is
    the page's own credential, from any site."""
    cookie = f"pulse_session={make_token('t1')}"
    evil = {"Origin": "https://evil.example", "Cookie": cookie}
    assert await close_of(url, path, headers=evil) == (4003, "origin_not_allowed")
    own = {"Origin": url.replace("ws://", "http://"), "Cookie": cookie}

    async def works(headers: dict[str, str], **params: str) -> None:
        async with open_ws(url, path, headers=headers, **params) as ws:
            if path == WS_PATH:
                assert (await recv(ws))["type"] == "connected"
            else:
                reply = await request(ws, {"action": "subscribe", "type": "alerts"})
                assert reply["type"] == "subscribed", reply

    await works(own)
    await works({"Origin": "https://elsewhere.example"}, token=make_token("t1"))
    await works({"Cookie": cookie})  # no Origin: not a browser page
    await until_no_connections(url, pool)


def _server_sockets(port: int) -> list[str]:
    """The TCP states of the server's connections on ``port`` (ESTABLISHED 01, CLOSE_WAIT
    08, ...), from /proc/net/tcp: the server's own end, whatever its client did. Not the
    listener (0A), nor TIME_WAIT (06): the kernel's memory of a connection the server
    closed first, which no process holds."""
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if int(local.split(":")[1], 16) == port and state not in ("0A", "06"):
            states.append(state)
    return states


async def test_a_client_cut_for_unread_replies_leaves_no_connection_behind(
    url: str, make_token: Callable[..., str]
) -> None:
    """From the WebSocket audit (HIGH): a client that sent actions without reading the
    replies was closed 4008, but hypercorn's reader was waiting to queue its next
    message for a handler that had ended: the client's close was never read, and the
    server's end stayed open with megabytes unread, counted by no limit, for ever."""
    port = int(url.rsplit(":", 1)[1])
    key = base64.b64encode(os.urandom(16))
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it reads nothing
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(raw, ("127.0.0.1", port))
    head = (
        f"GET {WS_PATH}?token={make_token('t1')} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n\r\n"
    )
    await loop.sock_sendall(raw, head.encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await loop.sock_recv(raw, 1)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    # Actions with large replies (a set_metrics reply echoes its ~58 kB list), so that
    # the server's socket buffers and then its 1 MiB of unread replies fill within a
    # hundred or so of them, even on a busy machine.
    names = [f"m{i:03d}_" + "x" * 59 for i in range(900)]
    frame = masked_text(orjson.dumps({"action": "set_metrics", "metrics": names}))
    # Actions until the server stops taking them (its replies unread, it cut us).
    stuck_since = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(0.2):
                await loop.sock_sendall(raw, frame)
            stuck_since = None
        except TimeoutError:
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since > 2:
                break
        except OSError:
            break
    # Then it reads what the server sent (its replies, its close) and closes: a FIN,
    # nothing left unread on its side.
    while True:
        try:
            async with asyncio.timeout(2):
                if not await loop.sock_recv(raw, 65536):
                    break
        except (TimeoutError, ConnectionResetError):  # a reset: the server has closed
            break
    raw.close()
    deadline = time.monotonic() + 15
    while left := _server_sockets(port):
        assert time.monotonic() < deadline, f"the server kept {left}"
        await asyncio.sleep(0.1)
