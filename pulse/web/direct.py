"""Ready-made bytes written straight to a connection: the scope extension streams use.

Through ASGI, every SSE chunk and every WebSocket message is one message through
Quart, hypercorn's stream and h11 or wsproto: tens of microseconds per subscriber
per delivery, which is what bounds fan-out. When the server offers it
(``pulse.serving`` does, under the hypercorn it was written for), a stream's
scope carries an extension whose calls take the bytes the framing layer would
have produced and write them under the connection's own lock, so nothing
interleaves. A handler that finds no extension, or runs with
``PULSE_DIRECT_WRITES=0``, sends (and reads) the plain ASGI way.

- ``CHUNKS`` (HTTP/1.1 responses): the bytes are one chunk of the response body,
  for a response already started without a Content-Length.
- ``FRAMES`` (WebSockets): the bytes are whole text frames, as made by
  ``text_frame`` (sound because no WebSocket extension is ever negotiated).

The calls (``DirectWrites``):
- ``send(data)`` waits for room, like any write;
- ``write_now(data)`` writes only when it can do so at once, without waiting:
  nothing else is being written or waiting to be, and everything written before
  has reached the socket. False means nothing was written;
- ``abort_unread()`` drops the connection when bytes written to it are still
  waiting for the client (a client that stopped reading).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

CHUNKS = "pulse.http.chunks"
FRAMES = "pulse.websocket.frames"
# An HTTP request's ASGI events, watched as they arrive: ``watch_inbound``.
INBOUND = "pulse.http.inbound"
# A WebSocket ping frame (RFC 6455 section 5.5.2), which ASGI has no message for:
# ``ping_sender``.
PING = "pulse.websocket.ping"


@dataclasses.dataclass(frozen=True, slots=True)
class DirectWrites:
    send: Callable[[bytes], Awaitable[None]]
    write_now: Callable[[bytes], bool]
    abort_unread: Callable[[], None]


def direct_writes(
    scope: Mapping[str, Any], extension: str, *, enabled: bool
) -> DirectWrites | None:
    """The extension's calls when the server offers it and they are ``enabled``, else None."""
    offered = (scope.get("extensions") or {}).get(extension) if enabled else None
    return DirectWrites(**offered) if offered else None


def watch_inbound(
    scope: Mapping[str, Any], callback: Callable[[dict[str, Any]], None], *, enabled: bool
) -> Callable[[], None] | None:
    """Have ``callback`` called with each of the request's ASGI events, those already
    arrived first, where the server offers it and it is ``enabled`` (None otherwise:
    read them from ``receive``). Returns what stops the calls."""
    offered = (scope.get("extensions") or {}).get(INBOUND) if enabled else None
    if not offered:
        return None
    watch: Callable[[Callable[[dict[str, Any]], None] | None], None] = offered["watch"]
    watch(callback)
    return lambda: watch(None)


def ping_sender(scope: Mapping[str, Any]) -> Callable[[], Awaitable[None]] | None:
    """What sends a ping frame on this WebSocket, where the server offers it (whether
    or not direct writes are enabled: it is not a faster way to send something ASGI
    has); None otherwise."""
    offered = (scope.get("extensions") or {}).get(PING)
    return offered["send"] if offered else None  # type: ignore[no-any-return]


def text_frame(payload: bytes) -> bytes:
    """An unfragmented, unmasked text frame (RFC 6455 section 5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        return b"\x81%c%b" % (size, payload)
    if size < 1 << 16:
        return b"\x81\x7e%b%b" % (size.to_bytes(2, "big"), payload)
    return b"\x81\x7f%b%b" % (size.to_bytes(8, "big"), payload)


def chunk(data: bytes) -> bytes:
    """One chunk of an HTTP/1.1 chunked body (RFC 9112 section 7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)
