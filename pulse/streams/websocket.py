"""What both WebSockets share: the handshake, close codes, inbound frames, and the one close.

``serve_websocket(kind, body)`` accepts the handshake first, so that every
failure after it (origin, auth, limits, bad parameters) reaches the browser as
a close code and reason it can read (CONTRACT section 5). ``body`` raises
``Close`` (or ApiError, LimitReached, DatabaseUnavailable, which map to close
codes here) to end the connection; ``Connection.close`` is the one place a
handler's connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import orjson
from quart import websocket
from quart.asgi import ASGIWebsocketConnection

from pulse.app import runtime
from pulse.auth.http import websocket_close_code
from pulse.db.errors import DatabaseUnavailable
from pulse.errors import ApiError
from pulse.streams.direct import FRAMES, direct_writes, text_frame
from pulse.streams.limits import LimitReached
from pulse.streams.messages import MAX_INBOUND_BYTES

log = logging.getLogger(__name__)

NORMAL = 1000
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVER_RESTARTING = 1012
BAD_REQUEST = 4000
UNAUTHORIZED = 4001
FORBIDDEN = 4003
LAGGING = 4008
LIMIT_REACHED = 4029

# Replies to a client's messages wait here while the client is not reading; a
# client that sends this many without reading the answers is cut as lagging,
# so that neither its replies nor its unread messages pile up in memory.
OUTBOX_SIZE = 256
# How long a close frame may wait for a client that stopped reading.
CLOSE_TIMEOUT_S = 5.0

# How a telemetry stream's End reason closes a WebSocket.
END_CLOSES = {
    "lagging": (LAGGING, "lagging"),
    "token_expired": (UNAUTHORIZED, "token_expired"),
    "server_restarting": (SERVER_RESTARTING, "server_restarting"),
}


class Close(Exception):
    """Raised inside a handler to end its connection with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class Connection:
    """One accepted WebSocket."""

    def __init__(self) -> None:
        # Made on the first reply: most dashboards never send a message, and an
        # idle connection should cost as little as possible.
        self._outbox: asyncio.Queue[bytes] | None = None
        self._sender: asyncio.Task[None] | None = None
        self.closed = False
        self._direct = direct_writes(websocket.scope, FRAMES)

    async def send(self, message: bytes | dict[str, Any]) -> None:
        """Send one JSON message as a text frame (browsers read binary frames as Blobs)."""
        data = message if isinstance(message, bytes) else orjson.dumps(message)
        await websocket.send(data.decode())

    async def send_many(self, payloads: Sequence[bytes]) -> None:
        """Several JSON messages, a text frame each, in one write when the server allows.

        A subscriber that fell behind gets what it missed in one system call
        instead of one pass through the ASGI stack per message.
        """
        if self._direct is not None:
            if payloads:
                await self._direct.send(b"".join(map(text_frame, payloads)))
            return
        for payload in payloads:
            await self.send(payload)

    def write_now(self, payloads: Sequence[bytes]) -> bool:
        """``send_many`` if it can be done at once, without waiting; else False and nothing sent.

        For the hub's direct delivery (Subscription.deliver_now).
        """
        if self._direct is None or self.closed:
            return False
        return self._direct.write_now(b"".join(map(text_frame, payloads)))

    def drop_unread(self) -> None:
        """Drop the connection if the client left frames unread (Subscription.drop_unread)."""
        if self._direct is not None:
            self._direct.abort_unread()

    def reply(self, message: dict[str, Any]) -> None:
        """Queue an answer to a client's message without waiting for the client to read."""
        if self._outbox is None:
            self._outbox = asyncio.Queue(OUTBOX_SIZE)
            self._sender = asyncio.create_task(self._send_replies(self._outbox))
        try:
            self._outbox.put_nowait(orjson.dumps(message))
        except asyncio.QueueFull:
            raise Close(LAGGING, "lagging") from None

    async def receive(self) -> str | bytes:
        data = await websocket.receive()
        # The server enforces this too (hypercorn's websocket_max_message_size),
        # but counts characters of text frames, not bytes.
        size = len(data)
        if isinstance(data, str) and size * 4 > MAX_INBOUND_BYTES:  # up to 4 bytes a character
            size = len(data.encode())
        if size > MAX_INBOUND_BYTES:
            raise Close(MESSAGE_TOO_BIG, "message_too_big")
        return data

    async def run(self, *parts: Coroutine[Any, Any, None]) -> None:
        """Run ``parts`` together until one of them ends, then stop the others.

        Whichever ends first decides: its exception (usually Close) is raised
        after the others are cancelled. A part cancelled from outside (the hub
        cancels a lagging stream stuck writing to its client) counts as lagging.
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
            raise Close(LAGGING, "lagging")
        done.result()
        raise Close(NORMAL, "")

    @staticmethod
    async def _send_replies(outbox: asyncio.Queue[bytes]) -> None:
        while True:
            data = await outbox.get()
            await websocket.send(data.decode())

    async def close(self, code: int, reason: str) -> None:
        """The one place a handler's connection is closed (at most once)."""
        if self.closed:
            return
        self.closed = True
        # A client that stopped reading cannot take the close frame either:
        # give up after a while rather than hold the handler forever.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                if code != LAGGING and self._outbox is not None:  # replies still queued first
                    while not self._outbox.empty():
                        await websocket.send(self._outbox.get_nowait().decode())
                await websocket.close(code, reason)


async def serve_websocket(
    kind: str,
    body: Callable[[Connection], Awaitable[None]],
    *,
    headers: dict[str, str] | None = None,
) -> None:
    """Accept the handshake, run ``body``, and close with the code that fits how it ended."""
    rt = runtime()
    await websocket.accept(headers=headers or {})
    connection = Connection()
    try:
        check_origin(websocket.headers.get("Origin"), rt.settings.allowed_origins)
        await body(connection)
        code, reason = NORMAL, ""
    except Disconnected:
        return  # nobody to tell
    except Close as exc:
        code, reason = exc.code, exc.reason
    except ApiError as exc:
        code, reason = websocket_close_code(exc), exc.code
    except LimitReached:
        code, reason = LIMIT_REACHED, "connection_limit"
    except DatabaseUnavailable as exc:
        if rt.draining:
            code, reason = SERVER_RESTARTING, "server_restarting"
        else:
            log.warning("closing a %s WebSocket: %s", kind, exc)
            code, reason = INTERNAL_ERROR, "database_unavailable"
    except Exception:
        log.exception("a %s WebSocket failed", kind)
        code, reason = INTERNAL_ERROR, "internal_error"
    await connection.close(code, reason)


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


class Disconnected(Exception):
    """The client's side of the WebSocket is gone: raised by ``websocket.receive()``."""


class _Received:
    """``websocket.receive()`` for a handler: the next message, straight from ASGI.

    Stands where Quart keeps a queue that a task of its own fills. After the
    disconnect, every call raises Disconnected.
    """

    __slots__ = ("_disconnected", "_receive")

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self._disconnected = False

    async def get(self) -> str | bytes:
        while not self._disconnected:
            event = await self._receive()
            if event["type"] == "websocket.receive":
                return event.get("bytes") or event["text"]  # type: ignore[no-any-return]
            if event["type"] == "websocket.disconnect":
                self._disconnected = True
            # websocket.connect, the first event, says nothing the handler needs.
        raise Disconnected


class WebsocketConnection(ASGIWebsocketConnection):  # type: ignore[misc]
    """Quart's ASGI WebSocket handling, with the handler reading straight from ASGI.

    Installed as the app's ``asgi_websocket_class`` (create_app). Quart runs a
    task per WebSocket that moves every message into an unbounded queue and
    cancels the handler when the client disconnects. Here ``websocket.receive()``
    takes the next ASGI event itself: no task and no queue, about 1.5 KB less
    per idle WebSocket, and a client sending faster than its handler reads is
    held back by TCP (hypercorn's app queue is bounded). A disconnect raises
    Disconnected in that read, which every handler keeps waiting in
    (``Connection.run``); ``serve_websocket`` then ends quietly.
    """

    async def __call__(self, receive: Any, send: Any) -> None:
        self.queue = _Received(receive)  # type: ignore[assignment]  # get only
        await self.handle_websocket(self._create_websocket_from_scope(send), send)


def check_origin(origin: str | None, allowed: tuple[str, ...]) -> None:
    """With PULSE_ALLOWED_ORIGINS set, a browser page from any other origin is refused.

    A handshake without an Origin header does not come from a browser page
    (which always sends one), so cross-site hijacking does not apply to it.
    """
    if not allowed or origin is None or "*" in allowed:
        return
    if origin.rstrip("/").lower() not in {o.rstrip("/").lower() for o in allowed}:
        raise Close(FORBIDDEN, "origin_not_allowed")


def _close_protocol_errors_properly() -> None:
    """Make hypercorn answer a WebSocket protocol error with a close frame.

    wsproto reports a frame it cannot accept (invalid UTF-8 in a text frame,
    a bad opcode...) as a CloseConnection event carrying the RFC 6455 code
    (1007, 1002) but leaves the connection open; hypercorn 0.17-0.18 then
    drops the TCP connection without the close frame, so the client only sees
    1006. Marking the connection as closed by the peer makes hypercorn send the
    close frame with wsproto's code, as RFC 6455 section 7.1.7 asks.
    """
    from hypercorn.protocol import ws_stream
    from wsproto.connection import ConnectionState
    from wsproto.events import CloseConnection

    base = ws_stream.Connection  # type: ignore[attr-defined]
    if getattr(base, "pulse_closes_protocol_errors", False):
        return

    class _Connection(base):  # type: ignore[misc, valid-type]
        pulse_closes_protocol_errors = True

        def events(self) -> Any:
            for event in super().events():
                if isinstance(event, CloseConnection) and self.state is ConnectionState.OPEN:
                    self._state = ConnectionState.REMOTE_CLOSING
                yield event

    ws_stream.Connection = _Connection  # type: ignore[attr-defined]


def _refuse_compression() -> None:
    """Never accept permessage-deflate, which hypercorn accepts whenever a client offers it.

    Browsers always offer it. Accepted, it costs each connection a zlib
    compressor with a 32 KiB window and its own deflate state (an idle browser
    WebSocket measured 140 KiB of server memory instead of 46), and every
    message is compressed once per subscriber rather than framed once for all.
    Telemetry messages are a few hundred bytes, so little is saved on the wire.
    Refusing is part of the handshake (RFC 7692 section 5): clients then send
    and receive plain frames.
    """
    from hypercorn.protocol import ws_stream
    from wsproto.extensions import PerMessageDeflate

    class _Refused(PerMessageDeflate):
        def accept(self, offer: str) -> None:  # type: ignore[override]
            return None

    ws_stream.PerMessageDeflate = _Refused  # type: ignore[attr-defined]


_close_protocol_errors_properly()
_refuse_compression()
