"""A lean load generator on raw asyncio streams, so the client is not what is measured."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from urllib.parse import urlsplit

import orjson

_STATUS = re.compile(rb"HTTP/1\.1 (\d{3})")
_LENGTH = re.compile(rb"\r\ncontent-length: (\d+)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection: close\r\n", re.IGNORECASE)
_EVENT_ID = re.compile(rb'"type":"telemetry","id":(\d+)')


class HttpConnection:
    """One keep-alive HTTP/1.1 connection for small request/response exchanges."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> HttpConnection:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def build(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        if body:
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        assert self._reader is not None and self._writer is not None
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = _STATUS.match(head)
        length = _LENGTH.search(head)
        body = await self._reader.readexactly(int(length[1])) if length else b""
        if _CLOSE.search(head):
            # The server ends keep-alive connections after a number of requests
            # (hypercorn's keep_alive_max_requests): open a new one, as clients do.
            self._writer.close()
            await self.open()
        return (int(status[1]) if status else 0), body


async def post_batches(
    url: str, bodies: list[bytes], stop: float, latencies: list[float] | None = None
) -> int:
    """POST the batch bodies in turn on one connection until ``stop``; return readings
    accepted, and add each request's latency (seconds) to ``latencies``."""
    conn = await HttpConnection(url).open()
    requests = [conn.build("POST", "/ingest/v1/batch", body) for body in bodies]
    accepted = 0
    i = 0
    while time.perf_counter() < stop:
        sent = time.perf_counter()
        status, payload = await conn.exchange(requests[i % len(requests)])
        assert status == 200, (status, payload[:200])
        if latencies is not None:
            latencies.append(time.perf_counter() - sent)
        accepted += orjson.loads(payload)["accepted"]
        i += 1
    await conn.close()
    return accepted


class StreamCounter:
    """An SSE or WebSocket subscriber that counts telemetry events and samples latency.

    For each chunk received it notes the time and the last event id in it, so that
    commit-to-client latency can be computed against the ingest side's ack times.
    """

    def __init__(self) -> None:
        self.events = 0
        self.samples: list[tuple[int, float]] = []  # (event id, receive time)
        self.connected = asyncio.Event()
        self.failed: str | None = None
        self._tail = b""
        self._tail_markers = 0

    def _count(self, chunk: bytes, now: float) -> None:
        # A marker may straddle two reads: keep the end of the last one.
        chunk, self._tail = self._tail + chunk, chunk[-40:]
        n = chunk.count(b'"type":"telemetry"') - self._tail_markers
        self._tail_markers = self._tail.count(b'"type":"telemetry"')
        if n:
            self.events += n
            ids = _EVENT_ID.findall(chunk)
            if ids:
                self.samples.append((int(ids[-1]), now))

    async def sse(
        self,
        url: str,
        path: str,
        token: str,
        last_event_id: int | None = None,
        *,
        ticket: str | None = None,
    ) -> None:
        """Follow an SSE stream opened with ``token``, or with ``ticket`` as a browser does.
        ``connected`` is set at its first chunk, ``retry:``, which the server sends once it
        has admitted the stream (the response head goes first, before the admission)."""
        extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id is not None else ""
        auth = "" if ticket else f"Authorization: Bearer {token}\r\n"
        path = f"{path}?ticket={ticket}" if ticket else path
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\n{auth}{extra}\r\n".encode()
        await self._follow(url, request, b"HTTP/1.1 200", b"retry:")

    async def websocket(self, url: str, path: str, *, ready: bytes | None = None) -> None:
        """A raw WebSocket client: frames are not parsed, text payloads are counted by
        their marker (server-to-client frames are not masked). ``connected`` is set at
        the handshake, or with ``ready`` once that marker has arrived (the server
        accepts the handshake before it admits the connection).

        It offers permessage-deflate as browsers do: a server that accepted it
        would compress the frames and the markers would not be found.
        """
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        ).encode()
        await self._follow(url, request, b"HTTP/1.1 101", ready)

    async def _follow(
        self, url: str, request: bytes, expected_status: bytes, ready: bytes | None = None
    ) -> None:
        """Send ``request``, then count what arrives until the server closes.

        A protocol, not a StreamReader: each read is counted in the transport's
        callback, with no task to wake, so the client costs little per delivery
        and its own scheduling is not what the latency measures.
        """
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        ended = loop.create_future()
        try:
            transport, _ = await loop.create_connection(
                lambda: _Counting(self, request, expected_status, ended, ready),
                parts.hostname,
                parts.port,
            )
        except OSError as exc:
            self.failed = str(exc)
            self.connected.set()
            return
        try:
            await ended
        finally:
            self.connected.set()
            transport.close()


class _Counting(asyncio.Protocol):
    def __init__(
        self,
        counter: StreamCounter,
        request: bytes,
        expected_status: bytes,
        ended: asyncio.Future[None],
        ready: bytes | None = None,
    ) -> None:
        self.counter = counter
        self.request = request
        self.expected_status = expected_status
        self.ended = ended
        self.ready = ready  # None: connected at the response head
        self.before_ready = b""
        self.head: bytes | None = b""  # None once the response head has been read
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[: end + 4], self.head[end + 4 :]
            self.head = None
            if not head.startswith(self.expected_status):
                self.counter.failed = head[:40].decode(errors="replace")
                assert self.transport is not None
                self.transport.close()
                return
            if self.ready is None:
                self.counter.connected.set()
            if not data:
                return
        if self.ready is not None:
            self.before_ready += data
            if self.ready in self.before_ready:
                self.ready = None
                self.counter.connected.set()
        self.counter._count(data, now)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head is not None or exc is not None:
            self.counter.failed = self.counter.failed or repr(exc or "closed before a response")
        elif self.ready is not None:
            closing = self.before_ready[:80].decode(errors="replace")
            self.counter.failed = self.counter.failed or f"closed before ready: {closing!r}"
        if not self.ended.done():
            self.ended.set_result(None)
