"""The WebSocket side of the tunings: protocol errors, no deflate.

Each function here changes a class of Quart, hypercorn or wsproto and is applied
by ``pulse.serving.tuning`` only under the versions it was written for.
"""

from __future__ import annotations

from typing import Any


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
