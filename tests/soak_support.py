"""The soak's workload and instruments (tests/test_soak.py), on loopback only.

Workload: steady ingest (batches and single readings with device tokens, three
tenants), stream clients that churn (SSE, telemetry WebSocket, legacy v2 WebSocket:
connect, read for a random short time, leave cleanly or by resetting the socket,
resume by id half of the time), clients that read slower than their stream, and
clients that stop reading for a while and then catch up. The warm-up (the first
fifth) runs at three times the load, and the slow clients start by replaying a
stored history, so that the allocator's peaks happen before memory is judged.

Instruments: a sampler of the server's RSS, live Python blocks, asyncio tasks,
database connections (pg_stat_activity) and open streams (the status endpoint).

The SSE clients are raw asyncio streams (so that a client can stop reading, or
reset its socket, exactly when it means to, and the chunked framing is checked);
the WebSocket clients are the `websockets` library with its keepalive pings off
(a client that stops reading must not be closed by its own library).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import signal
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import asyncpg
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.support import insert_readings

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"
WS_PATH = "/api/v1/customer/telemetry/stream"
V2_PATH = "/api/v2/ws"
STATUS_PATH = "/api/v1/telemetry/stream/status"
KINDS = ("sse", "websocket", "legacy_v2")
# This test's own database connections carry this name and are left out of the counts.
APPLICATION_NAME = "pulse-soak"

_GC_HOOK = '''"""Written by tests/soak_support.py for the server the soak starts, and only there.

SIGUSR2 runs a full garbage collection, so that the soak can count live objects
without the garbage the collector has not reached yet, then asks glibc to return
the memory it keeps free (malloc_trim), so that RSS shows what is in use rather than
the allocator's high-water mark. A module named soak_inject on the path is imported
too: how a leak is injected to see the soak fail.
"""

import contextlib
import ctypes
import ctypes.util
import gc
import signal

try:
    _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
except (OSError, AttributeError):
    _trim = None


def _collect(signum, frame):
    gc.collect()
    if _trim is not None:
        _trim(0)


signal.signal(signal.SIGUSR2, _collect)
with contextlib.suppress(ModuleNotFoundError):
    import soak_inject  # noqa: F401
'''


def gc_hook_env(directory: Path, extra_path: str = "") -> dict[str, str]:
    """PYTHONPATH for a server whose full garbage collection the soak can ask for
    (Sampler.collected): a sitecustomize in ``directory`` that makes SIGUSR2 run one;
    ``extra_path`` (and the caller's PYTHONPATH) after it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(_GC_HOOK)
    paths = [str(directory), extra_path, os.environ.get("PYTHONPATH", "")]
    return {"PYTHONPATH": os.pathsep.join(path for path in paths if path)}


@dataclasses.dataclass(frozen=True)
class Plan:
    duration_s: float
    tenants: tuple[str, ...] = ("soak-a", "soak-b", "soak-bulk")
    # Readings per second per tenant (180/s in all), and metrics per reading. The
    # slow clients follow the last tenant, whose readings are bigger (about 2.7 kB,
    # 240 kB/s): a client that stops reading is only cut as lagging once the server's
    # socket buffer is full (about 1 MB, see slow_socket) and then its queue. On a
    # machine so busy that ingest reaches a fifth of these rates, that still takes
    # less than the shortest stall (stall_s).
    rates: tuple[float, ...] = (60.0, 30.0, 90.0)
    metrics: tuple[int, ...] = (6, 6, 150)
    devices_per_tenant: int = 4
    batch: int = 5
    # Concurrent churning clients per transport (each loops connect, read, leave).
    churn: tuple[tuple[str, int], ...] = (("sse", 6), ("websocket", 6), ("legacy_v2", 4))
    # Clients that read slower than their stream, and clients that stop reading for a
    # while (stall_s) and then catch up; on the bulk tenant; the telemetry ones resume.
    slow: tuple[tuple[str, int], ...] = (("sse", 1), ("websocket", 1), ("legacy_v2", 1))
    stalled: tuple[tuple[str, int], ...] = (("sse", 1), ("websocket", 1), ("legacy_v2", 1))
    life_s: tuple[float, float] = (0.1, 3.0)  # a churning connection's lifetime
    stall_s: tuple[float, float] = (20.0, 35.0)  # a stalled client's time without reading
    # Readings of the bulk tenant stored before the load: the slow clients start by
    # replaying them, so the memory a replay takes is there from the first seconds.
    history: int = 4000
    sample_every_s: float = 2.0
    warmup_fraction: float = 0.2
    # During warm-up: ingest this many times faster, and this many times the churning
    # clients, so that the allocator reaches its working size before memory is judged.
    boost: float = 3.0
    seed: int = 8


@dataclasses.dataclass
class Transport:
    """What the clients of one transport did and saw."""

    opened: int = 0
    closed: int = 0
    clean: int = 0  # the client closed (FIN / close frame)
    abrupt: int = 0  # the client reset its socket
    by_server: int = 0  # the server ended it (lagging, ...)
    dropped: int = 0  # of those, reset by the server: cut as lagging and still not reading
    resumed: int = 0
    lagging: int = 0
    events: int = 0
    refused: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    close_codes: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    order_errors: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)

    def failed(self, what: str) -> None:
        if len(self.failures) < 20:
            self.failures.append(what)

    def summary(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["refused"] = dict(self.refused)
        out["close_codes"] = {str(k): v for k, v in sorted(self.close_codes.items())}
        return out


@dataclasses.dataclass
class Received:
    """One unfiltered telemetry connection's ids, for the gap and duplicate check."""

    tenant: str
    after: int | None  # the id it resumed from, or the newest id when it started live
    first: int
    last: int
    count: int
    reset: bool


class ChunkedSSE:
    """Decodes a chunked HTTP body and parses the SSE events in it, fed any bytes."""

    def __init__(self) -> None:
        self._raw = bytearray()
        self._body = bytearray()
        self._left = 0  # bytes of the current chunk still to come
        self._state = "size"
        self.ended = False  # the last (empty) chunk arrived

    def feed(self, data: bytes) -> list[tuple[str | None, str | None, str | None]]:
        """The complete events so far: (event name, id, data or None when it had none)."""
        self._raw += data
        while not self.ended:
            if self._state == "size":
                end = self._raw.find(b"\r\n")
                if end < 0:
                    break
                size = int(bytes(self._raw[:end]).split(b";")[0], 16)
                del self._raw[: end + 2]
                if size == 0:
                    self.ended = True
                    break
                self._left, self._state = size, "data"
            elif self._state == "data":
                take = min(self._left, len(self._raw))
                if not take:
                    break
                self._body += self._raw[:take]
                del self._raw[:take]
                self._left -= take
                if not self._left:
                    self._state = "crlf"
            else:
                if len(self._raw) < 2:
                    break
                del self._raw[:2]
                self._state = "size"
        events = []
        while (end := self._body.find(b"\n\n")) >= 0:
            block = bytes(self._body[:end]).decode()
            del self._body[: end + 2]
            event: str | None = None
            id_: str | None = None
            data_lines = []
            for line in block.split("\n"):
                if line.startswith(":"):
                    continue
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "id":
                    id_ = value
                elif field == "data":
                    data_lines.append(value)
            if event is not None or id_ is not None or data_lines:
                events.append((event, id_, "\n".join(data_lines) if data_lines else None))
        return events


async def slow_socket(host: str, port: int) -> socket.socket:
    """A connected socket with the maximum segment size of an Ethernet path.

    On loopback the MSS is 64 KiB, and Linux sizes a socket's send buffer from it:
    the server's buffer toward a client that stopped reading grows to 4 MiB, which a
    stream of tens of KB/s takes minutes to fill. A real client's MSS (1460) keeps it
    near 1 MB, so the server's own backpressure (its queue, then `lagging`) is what
    a stalled client meets within the soak.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _reset_on_close(sock: socket.socket | None) -> None:
    """Closing now sends RST: the client vanished without a goodbye."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def seed_history(db: asyncpg.Connection, plan: Plan, devices: list[str]) -> list[int]:
    """Store ``plan.history`` readings of the bulk tenant the way ingest does; their ids."""
    rnd = random.Random(plan.seed)
    ids: list[int] = []
    for start in range(0, plan.history, 1000):
        readings = [
            (rnd.choice(devices), Workload._reading(rnd, plan.metrics[-1]))
            for _ in range(min(1000, plan.history - start))
        ]
        ids += await insert_readings(db, plan.tenants[-1], readings)
    return ids


class Workload:
    def __init__(
        self,
        url: str,
        plan: Plan,
        *,
        tokens: dict[str, str],
        devices: dict[str, list[tuple[str, str]]],
    ) -> None:
        self.url = url
        self.plan = plan
        self.tokens = tokens  # tenant -> a customer JWT
        self.devices = devices  # tenant -> [(device id, provision token)]
        self.stop = asyncio.Event()
        self.acks: dict[str, set[int]] = {t: set() for t in plan.tenants}
        self.ingest_status: collections.Counter[int] = collections.Counter()
        self.rejected: collections.Counter[str] = collections.Counter()
        self.readings_sent = 0
        self.transports = {kind: Transport() for kind in KINDS}
        self.received: list[Received] = []
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80

    # -- running ----------------------------------------------------------------

    async def run(self) -> None:
        """The whole load for the plan's duration; returns once every client has left."""
        clients = self.tasks()
        await asyncio.sleep(self.plan.duration_s)
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 90)

    def tasks(self) -> list[asyncio.Task[None]]:
        plan = self.plan
        coros: list[Awaitable[None]] = [
            self._ingest(tenant, rate, n_metrics, i)
            for i, (tenant, rate, n_metrics) in enumerate(
                zip(plan.tenants, plan.rates, plan.metrics, strict=True)
            )
        ]
        for kind, n in plan.churn:
            coros += [self._churn(kind, slot) for slot in range(n)]
            extra = round(n * plan.boost) - n
            coros += [self._churn(kind, n + slot, warmup_only=True) for slot in range(extra)]
        for kind, n in plan.slow:
            coros += [self._slow(kind, slot, stall=False) for slot in range(n)]
        for kind, n in plan.stalled:
            coros += [self._slow(kind, slot, stall=True) for slot in range(n)]
        return [asyncio.ensure_future(c) for c in coros]  # type: ignore[arg-type]

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the workload stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, seconds))

    # -- ingest -----------------------------------------------------------------

    async def _ingest(self, tenant: str, rate: float, n_metrics: int, index: int) -> None:
        """``rate`` readings a second in groups of ``batch``: three groups in four as one
        batch request, the fourth as concurrent single readings (group commit)."""
        rnd = random.Random(self.plan.seed * 1000 + index)
        devices = self.devices[tenant]
        period = self.plan.batch / rate
        boost_until = time.monotonic() + self.plan.duration_s * self.plan.warmup_fraction
        limits = httpx.Limits(max_keepalive_connections=self.plan.batch)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as http:
            next_at = time.monotonic()
            n = 0
            while not self.stop.is_set():
                n += 1
                picks = [rnd.choice(devices) for _ in range(self.plan.batch)]
                if n % 4:
                    await self._post_batch(http, tenant, picks, rnd, n_metrics)
                else:
                    await asyncio.gather(
                        *(self._post_one(http, tenant, d, rnd, n_metrics) for d in picks)
                    )
                if n % 25 == 0:
                    device_id, token = picks[0]
                    r = await http.post(
                        f"/ingest/v1/tenant/{tenant}/device/{device_id}/heartbeat",
                        headers={"X-Provision-Token": token},
                    )
                    self.ingest_status[r.status_code] += 1
                next_at += period / (self.plan.boost if time.monotonic() < boost_until else 1)
                delay = next_at - time.monotonic()
                if delay < -1.0:  # far behind (a stalled machine): do not burst to catch up
                    next_at = time.monotonic()
                await self._pause(delay)

    @staticmethod
    def _reading(rnd: random.Random, n_metrics: int) -> dict[str, Any]:
        extra = {f"m{i:03d}": round(rnd.uniform(0, 1000), 3) for i in range(n_metrics - 6)}
        return extra | {
            "temp": round(rnd.uniform(0, 100), 2),  # above 99: the alert rule breaks
            "humidity": round(rnd.uniform(20, 80), 1),
            "voltage": round(rnd.uniform(3.0, 4.2), 3),
            "rssi": rnd.randint(-110, -40),
            "door_open": rnd.random() < 0.1,
            "pressure": round(rnd.uniform(980, 1040), 1),
        }

    async def _post_batch(
        self,
        http: httpx.AsyncClient,
        tenant: str,
        picks: list[tuple[str, str]],
        rnd: random.Random,
        n_metrics: int,
    ) -> None:
        messages = [
            {
                "tenant_id": tenant,
                "device_id": device_id,
                "provision_token": token,
                "metrics": self._reading(rnd, n_metrics),
            }
            for device_id, token in picks
        ]
        self.readings_sent += len(messages)
        r = await http.post("/ingest/v1/batch", json={"messages": messages})
        self.ingest_status[r.status_code] += 1
        if r.status_code in (200, 400):
            for result in r.json().get("results", ()):
                if result["status"] == "accepted":
                    self.acks[tenant].add(result["id"])
                else:
                    self.rejected[result["reason"]] += 1

    async def _post_one(
        self,
        http: httpx.AsyncClient,
        tenant: str,
        device: tuple[str, str],
        rnd: random.Random,
        n_metrics: int,
    ) -> None:
        device_id, token = device
        self.readings_sent += 1
        r = await http.post(
            f"/ingest/v1/tenant/{tenant}/device/{device_id}/telemetry",
            json={"metrics": self._reading(rnd, n_metrics)},
            headers={"X-Provision-Token": token},
        )
        self.ingest_status[r.status_code] += 1
        if r.status_code == 201:
            self.acks[tenant].add(r.json()["id"])
        else:
            self.rejected[str(r.status_code)] += 1

    # -- stream clients ---------------------------------------------------------

    async def _churn(self, kind: str, slot: int, *, warmup_only: bool = False) -> None:
        rnd = random.Random(f"{self.plan.seed}:{kind}:{slot}")
        last: dict[str, int] = {}
        until = time.monotonic() + self.plan.duration_s * self.plan.warmup_fraction
        while not self.stop.is_set() and not (warmup_only and time.monotonic() > until):
            tenant = rnd.choice(self.plan.tenants)
            resume = last.get(tenant) if rnd.random() < 0.5 else None
            newest = await self._connection(
                kind,
                tenant,
                resume,
                rnd,
                life_s=rnd.uniform(*self.plan.life_s),
                abrupt=rnd.random() < 0.4,
            )
            if newest is not None:
                last[tenant] = newest
            await self._pause(rnd.uniform(0, 0.3))

    async def _slow(self, kind: str, slot: int, *, stall: bool) -> None:
        """On the bulk tenant for the whole run: read slowly, or not at all for a while
        and then catch up; get cut as lagging, resume from the last id, and again."""
        rnd = random.Random(f"{self.plan.seed}:{kind}:{slot}:{'stalled' if stall else 'slow'}")
        tenant = self.plan.tenants[-1]
        last: int | None = 0  # the first connection replays the seeded history
        while not self.stop.is_set():
            newest = await self._connection(
                kind,
                tenant,
                last,
                rnd,
                life_s=10.0 if stall else self.plan.duration_s,
                abrupt=rnd.random() < 0.5,
                pause_s=0.0 if stall else 0.05,
                stall_s=rnd.uniform(*self.plan.stall_s) if stall else 0.0,
                real_mss=True,
            )
            last = newest if newest is not None else last
            await self._pause(rnd.uniform(0.2, 1.0))

    async def _connection(
        self,
        kind: str,
        tenant: str,
        resume: int | None,
        rnd: random.Random,
        *,
        life_s: float,
        abrupt: bool,
        pause_s: float = 0.0,
        stall_s: float = 0.0,
        real_mss: bool = False,
    ) -> int | None:
        """One connection; returns the newest event id it received (to resume from)."""
        stats = self.transports[kind]
        run: Callable[..., Awaitable[int | None]] = {
            "sse": self._sse,
            "websocket": self._ws,
            "legacy_v2": self._v2,
        }[kind]
        try:
            async with asyncio.timeout(life_s + stall_s + 60):
                return await run(
                    stats, tenant, resume, rnd, life_s, abrupt=abrupt, pause_s=pause_s,
                    stall_s=stall_s, real_mss=real_mss,
                )  # fmt: skip
        except Exception as exc:
            stats.failed(f"{kind}: {exc!r}")
            return None

    def _deadline(self, life_s: float) -> Callable[[], float]:
        end = time.monotonic() + life_s

        def remaining() -> float:
            return 0.0 if self.stop.is_set() else end - time.monotonic()

        return remaining

    async def _sse(
        self,
        stats: Transport,
        tenant: str,
        resume: int | None,
        rnd: random.Random,
        life_s: float,
        *,
        abrupt: bool,
        pause_s: float,
        stall_s: float,
        real_mss: bool,
    ) -> int | None:
        if real_mss:
            sock = await slow_socket(self.host, self.port)
            reader, writer = await asyncio.open_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        head = [f"GET {SSE_PATH} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        head.append(f"Authorization: Bearer {self.tokens[tenant]}")
        if resume is not None:
            head.append(f"Last-Event-ID: {resume}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        ended = False
        try:
            response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
            status = int(response[9:12])
            if status != 200:
                stats.refused[status] += 1
                return None
            stats.opened += 1
            stats.resumed += resume is not None
            parser = ChunkedSSE()
            seen = _Ids(tenant, resume)
            remaining = self._deadline(life_s)
            if stall_s:
                await self._pause(stall_s)  # reads nothing: the server's buffers fill
            while (left := remaining()) > 0:
                with contextlib.suppress(TimeoutError):
                    try:
                        data = await asyncio.wait_for(reader.read(1024 if pause_s else 65536), left)
                    except ConnectionResetError:
                        if not stall_s:
                            raise
                        stats.dropped += 1  # its unread bytes went with the connection
                        data = b""
                    if not data:
                        ended = True
                        break
                    for event, id_, body in parser.feed(data):
                        if event == "lagging":
                            stats.lagging += 1
                        elif event == "reset":
                            seen.reset = True
                        elif event is None and id_ is not None and body is None:
                            seen.position(int(id_))  # a live stream's starting point
                        elif event is None and id_ is not None:
                            stats.events += 1
                            stats.order_errors += not seen.add(int(id_))
                    if parser.ended:
                        ended = True
                        break
                if pause_s:
                    await asyncio.sleep(pause_s)
            self._record(seen, unfiltered=True)
            return seen.last
        finally:
            self._close_raw(stats, writer, ended=ended, abrupt=abrupt)

    def _close_raw(
        self, stats: Transport, writer: asyncio.StreamWriter, *, ended: bool, abrupt: bool
    ) -> None:
        stats.closed += 1
        if ended:
            stats.by_server += 1
        elif abrupt:
            stats.abrupt += 1
            _reset_on_close(writer.get_extra_info("socket"))
            writer.transport.abort()
            return
        else:
            stats.clean += 1
        writer.close()

    async def _open_ws(self, stats: Transport, path: str, **params: Any) -> ClientConnection | None:
        query = urlencode({k: v for k, v in params.items() if v is not None})
        url = f"ws://{self.host}:{self.port}{path}?{query}"
        try:
            ws = await connect(
                url, max_size=None, ping_interval=None, open_timeout=15, close_timeout=5
            )
        except InvalidStatus as exc:
            stats.refused[exc.response.status_code] += 1
            return None
        stats.opened += 1
        return ws

    async def _close_ws(self, stats: Transport, ws: ClientConnection, *, abrupt: bool) -> None:
        stats.closed += 1
        if ws.close_code is not None or ws.state.name == "CLOSED":
            stats.by_server += 1
            received = ws.protocol.close_rcvd
            code = received.code if received is not None else 1006
            stats.close_codes[code] += 1
            stats.dropped += received is None
            stats.lagging += code == 4008
            return
        if abrupt:
            stats.abrupt += 1
            _reset_on_close(ws.transport.get_extra_info("socket"))
            ws.transport.abort()
            return
        stats.clean += 1
        await ws.close()
        if ws.protocol.close_rcvd is not None:
            stats.close_codes[ws.protocol.close_rcvd.code] += 1

    async def _ws_messages(
        self,
        ws: ClientConnection,
        remaining: Callable[[], float],
        pause_s: float,
        handle: Callable[[dict[str, Any]], None],
        chat: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Read until the time is up or the server closes; between reads, ``chat``."""
        with contextlib.suppress(ConnectionClosed):
            while (left := remaining()) > 0:
                with contextlib.suppress(TimeoutError):
                    handle(json.loads(await asyncio.wait_for(ws.recv(), min(left, 1.0))))
                if chat is not None:
                    await chat()
                if pause_s:
                    await asyncio.sleep(pause_s)

    async def _ws(
        self,
        stats: Transport,
        tenant: str,
        resume: int | None,
        rnd: random.Random,
        life_s: float,
        *,
        abrupt: bool,
        pause_s: float,
        stall_s: float,
        real_mss: bool,
    ) -> int | None:
        ws = await self._open_ws(stats, WS_PATH, token=self.tokens[tenant], last_event_id=resume)
        if ws is None:
            return None
        stats.resumed += resume is not None
        seen = _Ids(tenant, resume)
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), 15))
            assert first["type"] == "connected", first
            if resume is None:
                seen.position(first["last_event_id"])
            if stall_s:
                await self._pause(stall_s)

            def handle(message: dict[str, Any]) -> None:
                if message["type"] == "telemetry":
                    stats.events += 1
                    stats.order_errors += not seen.add(message["id"])
                elif message["type"] == "reset":
                    seen.reset = True

            chatty = rnd.random() < 0.3
            next_ping = time.monotonic() + rnd.uniform(0.2, 1.0)

            async def chat() -> None:
                nonlocal next_ping
                if chatty and time.monotonic() >= next_ping:
                    next_ping = time.monotonic() + rnd.uniform(0.5, 1.5)
                    await ws.send(json.dumps({"action": "ping"}))

            await self._ws_messages(ws, self._deadline(life_s), pause_s, handle, chat)
            self._record(seen, unfiltered=True)
            return seen.last
        finally:
            await self._close_ws(stats, ws, abrupt=abrupt)

    async def _v2(
        self,
        stats: Transport,
        tenant: str,
        resume: int | None,
        rnd: random.Random,
        life_s: float,
        *,
        abrupt: bool,
        pause_s: float,
        stall_s: float,
        real_mss: bool,
    ) -> int | None:
        ws = await self._open_ws(stats, V2_PATH, token=self.tokens[tenant])
        if ws is None:
            return None
        seen = _Ids(tenant, None)
        try:
            devices = [d for d, _ in self.devices[tenant]]
            for device_id in rnd.sample(devices, 2):
                await ws.send(
                    json.dumps({"action": "subscribe", "type": "device", "device_id": device_id})
                )
            await ws.send(json.dumps({"action": "subscribe", "type": "alerts"}))
            await ws.send(json.dumps({"action": "subscribe", "type": "fleet"}))
            if stall_s:
                await self._pause(stall_s)

            def handle(message: dict[str, Any]) -> None:
                if message["type"] == "telemetry":
                    stats.events += 1
                    stats.order_errors += not seen.add(message["id"])
                elif message["type"] == "error":
                    stats.failed(f"legacy_v2 error message: {message}")

            await self._ws_messages(ws, self._deadline(life_s), pause_s, handle)
            return None
        finally:
            await self._close_ws(stats, ws, abrupt=abrupt)

    def _record(self, seen: _Ids, *, unfiltered: bool) -> None:
        if unfiltered and seen.first is not None and seen.last is not None:
            self.received.append(
                Received(seen.tenant, seen.after, seen.first, seen.last, seen.count, seen.reset)
            )

    # -- checks -----------------------------------------------------------------

    def delivery_errors(self, table_ids: dict[str, list[int]]) -> list[str]:
        """Each unfiltered connection got every row of its tenant between its first and
        last id, once, and its first event was the next row after its resume id or the
        newest id it was told of at the start (unless it was reset)."""
        errors = []
        for r in self.received:
            ids = table_ids[r.tenant]
            between = bisect.bisect_right(ids, r.last) - bisect.bisect_left(ids, r.first)
            if between != r.count:
                errors.append(f"{r}: {between} rows in the table between first and last")
            if r.after is not None and not r.reset:
                skipped = bisect.bisect_left(ids, r.first) - bisect.bisect_right(ids, r.after)
                if skipped:
                    errors.append(f"{r}: {skipped} rows skipped before the first event")
        return errors


class _Ids:
    def __init__(self, tenant: str, resumed_from: int | None) -> None:
        self.tenant = tenant
        self.after = resumed_from
        self.first: int | None = None
        self.last: int | None = resumed_from
        self.count = 0
        self.reset = False

    def position(self, id_: int) -> None:
        """An id without an event: where a live stream starts."""
        if self.first is None and self.after is None:
            self.after = id_
        self.last = id_ if self.last is None else max(self.last, id_)

    def add(self, id_: int) -> bool:
        """Record an id; False when it is not after the previous one."""
        in_order = self.last is None or id_ > self.last
        if self.first is None:
            self.first = id_
        self.last = id_
        self.count += 1
        return in_order


# -- the sampler ----------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    t: float  # seconds since the load started (negative: before)
    rss_kib: int
    py_blocks: int  # the Python allocator's live blocks: memory in use, free space not counted
    tasks: int
    pool_idle: int
    pool_in_use: int
    db: dict[str, int]  # the server's connections by application_name (POOL_NAME: the pool)
    idle_in_transaction: int
    streams: dict[str, int]  # the status endpoint's connection counts
    lagging: dict[str, int]  # pulse_lagging_disconnects_total by kind

    @property
    def db_total(self) -> int:
        return sum(self.db.values())

    def row(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_METRIC = re.compile(r"^(pulse_[a-z_]+)(?:\{([^}]*)\})? ([0-9.e+-]+)$", re.MULTILINE)


def parse_metrics(text: str) -> dict[tuple[str, str], float]:
    return {(name, labels or ""): float(value) for name, labels, value in _METRIC.findall(text)}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


DB_CONNECTIONS = """
SELECT application_name, count(*) AS n,
       count(*) FILTER (WHERE state LIKE 'idle in transaction%') AS idle_tx
  FROM pg_stat_activity
 WHERE datname = current_database()
   AND backend_type = 'client backend'
   AND application_name <> $1
 GROUP BY application_name
"""


class Sampler:
    def __init__(self, http: httpx.AsyncClient, db: asyncpg.Connection, pid: int) -> None:
        self.http = http
        self.db = db
        self.pid = pid
        self.t0 = time.monotonic()
        self.samples: list[Sample] = []

    async def sample(self) -> Sample:
        metrics = parse_metrics((await self.http.get("/metrics")).text)
        status = (await self.http.get(STATUS_PATH)).json()
        rows = await self.db.fetch(DB_CONNECTIONS, APPLICATION_NAME)
        return Sample(
            t=round(time.monotonic() - self.t0, 2),
            rss_kib=rss_kib(self.pid),
            py_blocks=int(metrics[("pulse_python_allocated_blocks", "")]),
            tasks=int(metrics[("pulse_asyncio_tasks", "")]),
            pool_idle=int(metrics.get(("pulse_db_pool_connections", 'state="idle"'), 0)),
            pool_in_use=int(metrics.get(("pulse_db_pool_connections", 'state="in_use"'), 0)),
            db={r["application_name"]: r["n"] for r in rows},
            idle_in_transaction=sum(r["idle_tx"] for r in rows),
            streams=status["connections"],
            lagging={
                kind: int(metrics.get(("pulse_lagging_disconnects_total", f'kind="{kind}"'), 0))
                for kind in KINDS
            },
        )

    async def collected(self) -> Sample:
        """A sample just after a full garbage collection in the server (see gc_hook_env):
        its live Python blocks are the objects in use, without collectable garbage."""
        os.kill(self.pid, signal.SIGUSR2)
        # The handler runs at the event loop's next turn, within a second when idle
        # (the status sweeper wakes it every second).
        await asyncio.sleep(1.5)
        return await self.sample()

    async def run(self, every_s: float, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.samples.append(await self.sample())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)


# -- the figures ------------------------------------------------------------------


def theil_sen_slope(points: list[tuple[float, float]]) -> float:
    """The median of the slopes between every pair of points: a trend that a few
    outlying samples do not move."""
    slopes = sorted(
        (y2 - y1) / (x2 - x1)
        for i, (x1, y1) in enumerate(points)
        for x2, y2 in points[i + 1 :]
        if x2 > x1
    )
    if not slopes:
        return 0.0
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2
