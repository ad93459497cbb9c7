"""The WebSocket side of the tunings: reading straight from ASGI, protocol errors, no deflate.

Each function here changes a class of Quart, hypercorn or wsproto and is applied
by ``pulse.serving.tuning`` only under the versions it was written for.
"""

from __future__ import annotations

from typing import Any

from quart.asgi import ASGIWebsocketConnection

from pulse.web.websocket import Disconnected


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

    Installed as the app's ``asgi_websocket_class``. Quart runs a task per
    WebSocket that moves every message into an unbounded queue and cancels the
    handler when the client disconnects. Here ``websocket.receive()`` takes the
    next ASGI event itself: no task and no queue, about 1.5 KB less per idle
    WebSocket, and a client sending faster than its handler reads is held back
    by TCP (hypercorn's app queue is bounded). A disconnect raises Disconnected
    in that read, which every handler keeps waiting in (``Connection.run``);
    ``serve_websocket`` then ends quietly.
    """

    async def __call__(self, receive: Any, send: Any) -> None:
        self.queue = _Received(receive)  # type: ignore[assignment]  # get only
        await self.handle_websocket(self._create_websocket_from_scope(send), send)


def close_protocol_errors_properly() -> None:
    """Make hypercorn answer a WebSocket protocol error with a close frame.

    wsproto reports a frame it cannot accept (invalid UTF-8 in a text frame,
    a bad opcode...) as a CloseConnection event carrying the RFC 6455 code
    (1007, 1002) but leaves the connection open; hypercorn then drops the TCP
    connection without the close frame, so the client only sees 1006. Marking
    the connection as closed by the peer makes hypercorn send the close frame
    with wsproto's code, as RFC 6455 section 7.1.7 asks.
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


def refuse_compression() -> None:
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
