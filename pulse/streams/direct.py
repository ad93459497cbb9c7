"""Ready-made bytes written straight to a connection, past the ASGI message per write.

Through ASGI, every SSE chunk and every WebSocket message is one message through
Quart, hypercorn's stream and h11 or wsproto: tens of microseconds per subscriber
per delivery, which is what bounds fan-out. Our hypercorn streams advertise a
scope extension whose ``send`` takes the bytes the framing layer would have
produced and writes them through hypercorn's connection, under the same lock as
every other write, so nothing interleaves. A handler that finds no extension
(under another server) sends the ASGI way; ``direct_send`` says which.

- ``CHUNKS`` (HTTP/1.1 requests): ``send(data)`` writes ``data`` as one chunk of
  the response body. Only for a response already started without a
  Content-Length, which HTTP/1.1 frames in chunks (h11 writes each chunk alone
  and keeps no count, and ends the body with its own last chunk).
- ``FRAMES`` (WebSockets): ``send(frames)`` writes whole text frames, as made by
  ``text_frame``. Sound because no WebSocket extension is ever negotiated (see
  ``websocket._refuse_compression``): a frame's bytes then depend on its
  payload only, and wsproto keeps no state for unfragmented messages it sends.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

CHUNKS = "pulse.http.chunks"
FRAMES = "pulse.websocket.frames"

Send = Callable[[bytes], Awaitable[None]]


def direct_send(scope: Mapping[str, Any], extension: str) -> Send | None:
    """The extension's ``send`` when the server offers it, else None."""
    offered = (scope.get("extensions") or {}).get(extension)
    return offered["send"] if offered else None


def text_frame(payload: bytes) -> bytes:
    """An unfragmented, unmasked text frame (RFC 6455 section 5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        return b"\x81%c%b" % (size, payload)
    if size < 1 << 16:
        return b"\x81\x7e%b%b" % (size.to_bytes(2, "big"), payload)
    return b"\x81\x7f%b%b" % (size.to_bytes(8, "big"), payload)


def _offer_direct_writes() -> None:
    from hypercorn.protocol import h11, http_stream, ws_stream
    from hypercorn.protocol.events import Data, Request
    from hypercorn.protocol.http_stream import ASGIHTTPState
    from hypercorn.protocol.ws_stream import ASGIWebsocketState

    if getattr(http_stream.HTTPStream, "pulse_writes_directly", False):
        return

    # Data is the event hypercorn's HTTP/1 protocol writes out as it is (the
    # bytes of an upgraded connection): both streams hand it their own bytes.

    class _HTTPStream(http_stream.HTTPStream):  # type: ignore[misc]
        pulse_writes_directly = True

        async def handle(self, event: Any) -> None:
            await super().handle(event)
            # The app task is spawned above but has not run yet; had it, it
            # would only miss the extension and send the ASGI way.
            if isinstance(event, Request) and event.http_version == "1.1":
                self.scope["extensions"][CHUNKS] = {"send": self._send_chunk}

        async def _send_chunk(self, data: bytes) -> None:
            if self.closed or self.state != ASGIHTTPState.RESPONSE or not data:
                return  # as for a body after the end: nothing to write to
            await self.send(
                Data(stream_id=self.stream_id, data=b"%x\r\n%b\r\n" % (len(data), data))
            )

    class _WSStream(ws_stream.WSStream):  # type: ignore[misc]
        pulse_writes_directly = True

        async def handle(self, event: Any) -> None:
            await super().handle(event)
            if isinstance(event, Request):
                self.scope["extensions"][FRAMES] = {"send": self._send_frames}

        async def _send_frames(self, frames: bytes) -> None:
            if self.closed or self.state != ASGIWebsocketState.CONNECTED:
                return  # as for websocket.send after the close: nothing to write to
            if self.connection._proto.extensions:
                raise RuntimeError("a WebSocket extension was negotiated; frames would differ")
            await self.send(Data(stream_id=self.stream_id, data=frames))

    http_stream.HTTPStream = _HTTPStream  # type: ignore[misc]
    ws_stream.WSStream = _WSStream  # type: ignore[misc]
    h11.HTTPStream = _HTTPStream  # type: ignore[attr-defined]
    h11.WSStream = _WSStream  # type: ignore[attr-defined]


_offer_direct_writes()
