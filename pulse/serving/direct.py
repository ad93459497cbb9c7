"""Direct writes under hypercorn's asyncio worker: the streams offer ``pulse.web.direct``.

Our subclasses of hypercorn's HTTP and WebSocket streams put the extension in
each stream's scope (GET requests over HTTP/1.1, and WebSockets): its ``send``
takes the bytes the framing layer would have produced and writes them through
hypercorn's connection, under the same lock as every other write.

- Chunks: only for a response already started without a Content-Length, which
  HTTP/1.1 frames in chunks (h11 writes each chunk alone and keeps no count,
  and ends the body with its own last chunk).
- Frames: sound because no WebSocket extension is ever negotiated
  (``pulse.serving.websocket.refuse_compression``): a frame's bytes then depend
  on its payload only, and wsproto keeps no state for unfragmented messages it
  sends.

The WebSocket stream also ends its app when hypercorn closes by itself (a message
over the size limit, 1009), which hypercorn does without a word to the app, and
writes no frame after that Close. It offers a ping frame too (``pulse.web.direct.PING``),
which ASGI has no message for: the v2 WebSocket's keepalive.

Also here: hypercorn's queue of ASGI events for an app task replaced by an
``InboundQueue`` (``bound_inbound_queues``), which an HTTP request's scope offers to
watch (``pulse.web.direct.INBOUND``). Applied by ``pulse.serving.tuning``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import socket
import struct
import termios
from collections.abc import Callable
from typing import Any

from pulse.serving.expect import continue_on_first_receive
from pulse.serving.inbound import InboundQueue
from pulse.serving.protocol_errors import answer_cut
from pulse.web.direct import CHUNKS, FRAMES, INBOUND, PING, chunk


class _Socket:
    """Synchronous writes to the connection hypercorn's asyncio TCPServer holds."""

    def __init__(self, server: Any) -> None:
        self.lock = server.send_lock
        self.transport = server.writer.transport

    def write_now(self, data: bytes) -> bool:
        lock, transport = self.lock, self.transport
        # A released lock with waiters is not "locked" until the first waiter
        # runs: its bytes were made first and go first.
        if lock.locked() or lock._waiters or transport.is_closing():
            return False
        if transport.get_write_buffer_size():
            return False  # the client has not taken what came before
        transport.write(data)
        return True

    def abort_unread(self) -> None:
        sock = self.transport.get_extra_info("socket")
        if not self.transport.get_write_buffer_size() and not _unacknowledged(sock):
            return
        # An abortive close (RFC 793 reset): a plain close would leave the
        # kernel trying to deliver what the client does not read, holding the
        # send buffer for minutes as an orphan socket.
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def _unacknowledged(sock: Any) -> int:
    """Bytes in the kernel's send queue the client has not acknowledged (Linux's
    SIOCOUTQ; 0 where it cannot be asked). The process's own buffer may be empty
    while the kernel holds what the client does not read: the kernel grows a
    connection's send buffer as it goes."""
    request = getattr(termios, "TIOCOUTQ", None)  # SIOCOUTQ, on Linux
    if sock is None or request is None:
        return 0
    try:
        queued: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    except (OSError, ValueError):  # ValueError: closed already (its fd is -1)
        return 0
    return queued


def _socket_of(stream: Any) -> _Socket | None:
    """The connection under a stream of hypercorn's asyncio worker; None under another."""
    from hypercorn.asyncio.tcp_server import TCPServer

    protocol = getattr(stream.send, "__self__", None)  # H11Protocol.stream_send
    server = getattr(getattr(protocol, "send", None), "__self__", None)  # TCPServer.protocol_send
    return _Socket(server) if isinstance(server, TCPServer) else None


def _offer(stream: Any, extension: str, send: Any, write_now: Any) -> None:
    """Put ``extension`` in the stream's scope, under hypercorn's asyncio worker only."""
    socket = _socket_of(stream)
    if socket is not None:
        stream._socket = socket
        stream.scope["extensions"][extension] = {
            "send": send,
            "write_now": write_now,
            "abort_unread": socket.abort_unread,
        }


def offer_direct_writes() -> None:
    """Swap hypercorn's HTTP and WebSocket stream classes for ours (once)."""
    from hypercorn.protocol import h11, http_stream, ws_stream
    from hypercorn.protocol.events import Data, Request
    from hypercorn.protocol.http_stream import ASGIHTTPState
    from hypercorn.protocol.ws_stream import ASGIWebsocketState
    from wsproto.connection import ConnectionState
    from wsproto.events import Ping
    from wsproto.frame_protocol import CloseReason

    CLOSING = ConnectionState.LOCAL_CLOSING
    TOO_BIG = CloseReason.MESSAGE_TOO_BIG.value

    if getattr(http_stream.HTTPStream, "pulse_writes_directly", False):
        return

    # Data is the event hypercorn's HTTP/1 protocol writes out as it is (the
    # bytes of an upgraded connection): both streams hand it their own bytes.

    class _HTTPStream(http_stream.HTTPStream):  # type: ignore[misc]
        pulse_writes_directly = True
        _socket: _Socket  # set by _offer with the extension

        async def handle(self, event: Any) -> None:
            await super().handle(event)
            # The app task is spawned above but has not run yet; had it, it
            # would only miss the extension and send the ASGI way. Streams
            # are GETs: other requests are spared the lookup.
            if isinstance(event, Request) and event.http_version == "1.1" and event.method == "GET":
                _offer(self, CHUNKS, self._send_chunk, self._write_chunk_now)

        async def _send_chunk(self, data: bytes) -> None:
            if self.closed or self.state != ASGIHTTPState.RESPONSE or not data:
                return  # as for a body after the end: nothing to write to
            await self.send(Data(stream_id=self.stream_id, data=chunk(data)))

        def _write_chunk_now(self, data: bytes) -> bool:
            if self.closed or self.state != ASGIHTTPState.RESPONSE:
                return False
            return not data or self._socket.write_now(chunk(data))

    class _WSStream(ws_stream.WSStream):  # type: ignore[misc]
        pulse_writes_directly = True
        _socket: _Socket  # set by _offer with the extension

        async def handle(self, event: Any) -> None:
            await super().handle(event)
            if isinstance(event, Request):
                _offer(self, FRAMES, self._send_frames, self._write_frames_now)
                if self.app_put is not None:  # a handshake hypercorn did not refuse
                    self.scope["extensions"][PING] = {"send": self._send_ping}

        # hypercorn sent a Close of its own: no frame may follow it (RFC 6455, 5.5.1).
        _closing = False

        async def _handle_events(self) -> None:
            await super()._handle_events()
            if (
                not self._closing
                and self.state == ASGIWebsocketState.CONNECTED  # not the app's own close
                and self.connection.state is CLOSING
                and self.app_put
            ):
                # hypercorn closed by itself (a message over its size limit: 1009) and,
                # unlike a client's close, tells the app nothing: it would stream on and
                # hold its connection slot until the client answered. The app ends now,
                # and its end ends the connection; what it sends meanwhile the ASGI way,
                # wsproto drops, and the direct way, the checks below.
                self._closing = True
                await self.app_put({"type": "websocket.disconnect", "code": TOO_BIG})

        async def _send_frames(self, frames: bytes) -> None:
            if self.closed or self._closing or self.state != ASGIWebsocketState.CONNECTED:
                return  # as for websocket.send after the close: nothing to write to
            self._check_no_extension()
            await self.send(Data(stream_id=self.stream_id, data=frames))

        def _write_frames_now(self, frames: bytes) -> bool:
            if self.closed or self._closing or self.state != ASGIWebsocketState.CONNECTED:
                return False
            self._check_no_extension()
            return not frames or self._socket.write_now(frames)

        async def _send_ping(self) -> None:
            # Through wsproto, which sends none once a Close has gone (its state).
            if self.closed or self.state != ASGIWebsocketState.CONNECTED:
                return
            socket = getattr(self, "_socket", None)
            if socket is not None and socket.transport.get_write_buffer_size():
                # The client has not taken what came before: it would not read the ping
                # either, and waiting for room would hold its stream (and its expiry).
                return
            await self._send_wsproto_event(Ping())

        def _check_no_extension(self) -> None:
            if self.connection._proto.extensions:
                raise RuntimeError("a WebSocket extension was negotiated; frames would differ")

    http_stream.HTTPStream = _HTTPStream  # type: ignore[misc]
    ws_stream.WSStream = _WSStream  # type: ignore[misc]
    h11.HTTPStream = _HTTPStream  # type: ignore[attr-defined]
    h11.WSStream = _WSStream  # type: ignore[attr-defined]


def bound_inbound_queues() -> None:
    """An InboundQueue instead of an asyncio.Queue for each app task's ASGI events (once).

    Bounded, so a client sending faster than its handler reads is held back by
    TCP; small, because an idle connection is mostly such structures.
    """
    from hypercorn.asyncio import task_group, tcp_server

    if getattr(tcp_server.TaskGroup, "pulse_bounds_inbound", False):  # type: ignore[attr-defined]
        return

    class _TaskGroup(task_group.TaskGroup):  # type: ignore[misc]
        """hypercorn's TaskGroup, with an InboundQueue for the app's ASGI events.

        hypercorn 0.18's spawn_app but for the queue, whose bound stays
        hypercorn's max_app_queue_size: an app task's ASGI events.
        """

        pulse_bounds_inbound = True

        async def spawn_app(self, app: Any, config: Any, scope: Any, send: Any) -> Any:
            app_queue: InboundQueue[Any] = InboundQueue(config.max_app_queue_size)
            if scope["type"] == "http":
                scope.setdefault("extensions", {})[INBOUND] = {"watch": app_queue.watch}

            def _call_soon(func: Callable[..., Any], *args: Any) -> Any:
                future = asyncio.run_coroutine_threadsafe(func(*args), self._loop)
                return future.result()

            async def run_app(*args: Any) -> None:
                try:
                    await app(*args)
                except asyncio.CancelledError:
                    if scope["type"] == "http":  # cut by the shutdown: 503, not hypercorn's 500
                        await answer_cut(send)
                    raise
                finally:
                    # Nobody reads it any more: a put waiting for room returns. The
                    # disconnect hypercorn then queues (in the send that ends the app)
                    # waited for ever behind a full queue, the socket never read again.
                    app_queue.close()

            receive: Callable[[], Any] = app_queue.get
            if scope["type"] == "http":  # 100 Continue when the app asks for the body
                receive = continue_on_first_receive(receive, send)
            self.spawn(
                task_group._handle,
                run_app,
                config,
                scope,
                receive,
                send,
                functools.partial(self._loop.run_in_executor, None),
                _call_soon,
            )
            return app_queue.put

    tcp_server.TaskGroup = _TaskGroup  # type: ignore[attr-defined, misc]
