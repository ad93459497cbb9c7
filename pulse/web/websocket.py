"""What both WebSockets share: served straight from ASGI, the handshake, close codes,
inbound frames, and the one close.

``WebSocketRoutes`` serves each WebSocket path Pulse has by its handler, in front
of Quart: a reconnect storm's handshakes then cost no request context, routing or
wrapper of Quart's (about a third of a WebSocket's admission), and nothing of
them stays with an idle connection. A ``Socket`` is one connection's ASGI events.

``serve_websocket(rt, socket, kind, body)`` accepts the handshake first, so that
every failure after it (origin, auth, limits, bad parameters) reaches the browser
as a close code and reason it can read (CONTRACT section 5). ``body`` raises
``Close`` (or ApiError, LimitReached, DatabaseUnavailable, which map to the
catalogue's close codes here) to end the connection; ``Connection.close`` is
the one place a handler's connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import orjson
from quart import Quart

from pulse.auth.access import require_unexpired
from pulse.auth.principal import Principal
from pulse.bus.events import TelemetryEvent, encoded
from pulse.db.errors import DatabaseUnavailable
from pulse.errors import (
    CONNECTION_LIMIT,
    DATABASE_UNAVAILABLE,
    INTERNAL_ERROR,
    INTERNAL_ERROR_CLOSE,
    LAGGING,
    MESSAGE_TOO_BIG_CLOSE,
    NORMAL_CLOSURE,
    ORIGIN_NOT_ALLOWED,
    SERVER_RESTARTING,
    ApiError,
    ErrorCode,
)
from pulse.logs import Throttled
from pulse.runtime import Runtime
from pulse.streams.limits import LimitReached
from pulse.streams.messages import MAX_INBOUND_BYTES, MESSAGE_TOO_BIG_REASON
from pulse.web import runtime_of
from pulse.web.asgi import ASGIReceiveCallable, ASGISendCallable, Scope, header, query_args
from pulse.web.auth import authenticate, is_allowed_origin, scope_credential
from pulse.web.direct import FRAMES, DirectWrites, direct_writes, ping_sender, text_frame

log = logging.getLogger(__name__)
# An outage refuses every WebSocket opened during it: a line per ten seconds for each
# kind of WebSocket, not one per connection (165 in 30 s from two reconnecting clients).
_UNAVAILABLE: defaultdict[str, Throttled] = defaultdict(lambda: Throttled(log))

# Replies to a client's messages wait here while the client is not reading; a
# client that sends this many without reading the answers, or whose unread answers
# pass OUTBOX_BYTES (a reply may echo a list of 64 KiB: 256 of them were 16 MB a
# connection), is cut as lagging, so that neither its replies nor its unread
# messages pile up in memory.
OUTBOX_SIZE = 256
OUTBOX_BYTES = 1024 * 1024
# How long a close frame may wait for a client that stopped reading.
CLOSE_TIMEOUT_S = 5.0


class Close(Exception):
    """Raised inside a handler to end its connection with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason

    @classmethod
    def of(cls, error: ErrorCode) -> Close:
        """The catalogue's close code for ``error``, with the error's code as reason."""
        return cls(error.close or INTERNAL_ERROR_CLOSE, error.code)


def frames(events: list[TelemetryEvent], metrics: frozenset[str] | None) -> bytes:
    """Events as text frames, ready for ``DirectWrites`` (a stream's frame function)."""
    return b"".join(map(text_frame, encoded(events, metrics)))


class Socket:
    """One WebSocket's ASGI events: the handshake's scope, and what comes and goes."""

    __slots__ = ("_disconnected", "_receive", "_send", "args", "scope")

    def __init__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        self.scope = scope
        self.args = query_args(scope["query_string"])  # as Quart's websocket.args.get
        self._receive = receive
        self._send = send
        self._disconnected = False

    def header(self, name: bytes) -> str | None:
        return header(self.scope, name)

    async def accept(self, headers: Mapping[str, str]) -> None:
        await self._send(
            {
                "type": "websocket.accept",
                "headers": [
                    (name.lower().encode(), value.encode()) for name, value in headers.items()
                ],
            }
        )

    async def send(self, text: str) -> None:
        await self._send({"type": "websocket.send", "text": text})

    async def receive(self) -> str | bytes:
        """The next message; Disconnected once the client has gone, then at every call."""
        while not self._disconnected:
            event = await self._receive()
            if event["type"] == "websocket.receive":
                # An empty binary frame is b"", not the (absent) text: `or` took the
                # text's None, and the handler failed with a traceback (close 1011).
                data = event.get("bytes")
                return data if data is not None else event["text"]  # type: ignore[no-any-return]
            if event["type"] == "websocket.disconnect":
                self._disconnected = True
            # websocket.connect, the first event, says nothing a handler needs.
        raise Disconnected

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


Handler = Callable[[Runtime, Socket], Coroutine[Any, Any, None]]


class WebSocketRoutes:
    """ASGI middleware: a WebSocket to one of ``routes``' paths is served by its handler;
    everything else goes on to ``inner`` (Quart)."""

    def __init__(self, app: Quart, inner: Any, routes: Mapping[str, Handler]) -> None:
        self._app = app
        self._inner = inner
        self._routes = dict(routes)

    def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Coroutine[Any, Any, None]:
        if scope["type"] == "websocket":
            path: str = scope["path"]
            handler = self._routes.get(path.removeprefix(scope.get("root_path") or ""))
            if handler is not None:
                return handler(runtime_of(self._app), Socket(scope, receive, send))
        return self._inner(scope, receive, send)  # type: ignore[no-any-return]


class Connection:
    """One accepted WebSocket."""

    def __init__(self, socket: Socket, rt: Runtime) -> None:
        self.socket = socket
        self.rt = rt
        # Made on the first reply: most dashboards never send a message, and an
        # idle connection should cost as little as possible.
        self._outbox: asyncio.Queue[bytes] | None = None
        self._outbox_bytes = 0
        self._sender: asyncio.Task[None] | None = None
        self.closed = False
        self.direct: DirectWrites | None = direct_writes(
            socket.scope, FRAMES, enabled=rt.settings.direct_writes
        )
        self._ping = ping_sender(socket.scope)

    async def authenticate(self, accept: Callable[[Principal], object]) -> Principal:
        """The caller, by the token or ticket of the handshake (header, cookie or query),
        as Quart's routes authenticate theirs; ``accept`` as in ``authenticate``. A
        process shutting down closes first, leaving a ticket for the next one."""
        if self.rt.draining:
            raise Close.of(SERVER_RESTARTING)
        args = self.socket.args
        credential = scope_credential(self.socket.scope, args, allow_query=True)
        origin = self.socket.header(b"origin")
        if (
            credential is not None
            and credential.source == "cookie"
            and origin is not None
            and not is_allowed_origin(
                origin, self.socket.header(b"host"), self.rt.settings.allowed_origins
            )
        ):
            # A browser sends the cookie with any site's handshake: only the server's
            # own pages (or PULSE_ALLOWED_ORIGINS) may stream by it, as for changes.
            raise Close.of(ORIGIN_NOT_ALLOWED)

        def checked(principal: Principal) -> None:
            require_unexpired(principal)  # or the connection would close at once
            accept(principal)

        return await authenticate(self.rt, credential, args, accept=checked)

    async def send(self, message: bytes | dict[str, Any]) -> None:
        """Send one JSON message as a text frame (browsers read binary frames as Blobs)."""
        data = message if isinstance(message, bytes) else orjson.dumps(message)
        await self.socket.send(data.decode())

    async def send_many(self, payloads: Sequence[bytes]) -> None:
        """Several JSON messages, a text frame each, in one write when the server allows.

        A subscriber that fell behind gets what it missed in one system call
        instead of one pass through the ASGI stack per message.
        """
        if self.direct is not None:
            if payloads:
                await self.direct.send(b"".join(map(text_frame, payloads)))
            return
        for payload in payloads:
            await self.send(payload)

    async def ping(self) -> None:
        """A ping frame, which every WebSocket client answers by itself and no page sees:
        traffic for the proxies on the way, which cut connections idle for long. A server
        that does not offer it (``pulse.serving.tuning`` off) pings by itself instead."""
        if self._ping is not None:
            await self._ping()

    def reply(self, message: dict[str, Any]) -> None:
        """Queue an answer to a client's message without waiting for the client to read."""
        if self._outbox is None:
            self._outbox = asyncio.Queue(OUTBOX_SIZE)
            self._sender = asyncio.create_task(self._send_replies())
        data = orjson.dumps(message)
        if self._outbox_bytes + len(data) > OUTBOX_BYTES:
            raise Close.of(LAGGING)
        try:
            self._outbox.put_nowait(data)
        except asyncio.QueueFull:
            raise Close.of(LAGGING) from None
        self._outbox_bytes += len(data)

    async def receive(self) -> str | bytes:
        data = await self.socket.receive()
        # The server enforces this too (hypercorn's websocket_max_message_size),
        # but counts characters of text frames, not bytes.
        size = len(data)
        if isinstance(data, str) and size * 4 > MAX_INBOUND_BYTES:  # up to 4 bytes a character
            size = len(data.encode())
        if size > MAX_INBOUND_BYTES:
            # The sentence hypercorn's own 1009 carries too (pulse.serving.websocket),
            # rather than the catalogue's code: a client cannot tell who closed.
            raise Close(MESSAGE_TOO_BIG_CLOSE, MESSAGE_TOO_BIG_REASON)
        return data

    async def run(self, *parts: Coroutine[Any, Any, None]) -> None:
        """Run ``parts`` together until one of them ends, then stop the others.

        Whichever ends first decides: its exception (usually Close) is raised
        after the others are cancelled. A part cancelled from outside (a stream cut
        as lagging and stuck writing to its client) counts as lagging.
        """
        tasks = [asyncio.ensure_future(part) for part in parts]
        try:
            done = await first_done(tasks)
        finally:
            if self._sender is not None:
                tasks.append(self._sender)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if done.cancelled():
            raise Close.of(LAGGING)
        done.result()
        raise Close(NORMAL_CLOSURE, "")

    async def _send_replies(self) -> None:
        assert self._outbox is not None
        while True:
            data = await self._outbox.get()
            await self.socket.send(data.decode())
            self._outbox_bytes -= len(data)

    async def close(self, code: int, reason: str) -> None:
        """The one place a handler's connection is closed (at most once)."""
        if self.closed:
            return
        self.closed = True
        # A client that stopped reading cannot take the close frame either:
        # give up after a while rather than hold the handler forever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                if code != LAGGING.close and self._outbox is not None:  # replies queued first
                    while not self._outbox.empty():
                        await self.socket.send(self._outbox.get_nowait().decode())
                await self.socket.close(code, reason)


async def serve_websocket(
    rt: Runtime,
    socket: Socket,
    kind: str,
    body: Callable[[Connection], Awaitable[None]],
    *,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Accept the handshake, run ``body``, and close with the code that fits how it ended."""
    await socket.accept(headers or {})
    connection = Connection(socket, rt)
    try:
        check_origin(socket.header(b"origin"), rt.settings.allowed_origins)
        await body(connection)
        end = Close(NORMAL_CLOSURE, "")
    except Disconnected:
        return  # nobody to tell
    except Close as exc:
        end = exc
    except ApiError as exc:
        end = Close(exc.close_code, exc.code)
    except LimitReached:
        end = Close.of(CONNECTION_LIMIT)
    except DatabaseUnavailable as exc:
        if rt.draining:
            end = Close.of(SERVER_RESTARTING)
        else:
            _UNAVAILABLE[kind].warning("closing a %s WebSocket: %s", kind, exc)
            end = Close.of(DATABASE_UNAVAILABLE)
    except Exception:
        log.exception("a %s WebSocket failed", kind)
        end = Close.of(INTERNAL_ERROR)
    await connection.close(end.code, end.reason)


class Disconnected(Exception):
    """The client's side of the WebSocket is gone: raised by ``Socket.receive()``."""


async def first_done(tasks: Sequence[asyncio.Future[Any]]) -> asyncio.Future[Any]:
    """The first of ``tasks`` to end.

    asyncio.wait(FIRST_COMPLETED) does the same, holding a set, a future and a
    callback per task for as long as it waits: about 2 KB for each idle
    WebSocket, which waits for as long as it is open.
    """
    first: asyncio.Future[asyncio.Future[Any]] = asyncio.get_running_loop().create_future()

    def ended(task: asyncio.Future[Any]) -> None:
        if not first.done():
            first.set_result(task)

    for task in tasks:
        task.add_done_callback(ended)
    try:
        return await first
    finally:
        for task in tasks:
            task.remove_done_callback(ended)


def check_origin(origin: str | None, allowed: tuple[str, ...]) -> None:
    """With PULSE_ALLOWED_ORIGINS set, a browser page from any other origin is refused.

    A handshake without an Origin header does not come from a browser page
    (which always sends one), so cross-site hijacking does not apply to it.
    """
    if not allowed or origin is None or "*" in allowed:
        return
    if origin.rstrip("/").lower() not in {o.rstrip("/").lower() for o in allowed}:
        raise Close.of(ORIGIN_NOT_ALLOWED)
