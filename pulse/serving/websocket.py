"""The WebSocket side of the tunings: protocol errors and their close reasons, no deflate.

Each function here changes a class of Quart, hypercorn or wsproto and is applied
by ``pulse.serving.tuning`` only under the versions it was written for.
"""

from __future__ import annotations

from typing import Any

from pulse.streams.messages import INVALID_UTF8_REASON, MESSAGE_TOO_BIG_REASON


def close_protocol_errors_properly() -> None:
    """Make hypercorn answer a WebSocket protocol error with a close frame, and give the
    closes the WebSocket layer makes by itself for a frame (1007, 1009) a stable reason.

    wsproto reports a frame it cannot accept (invalid UTF-8 in a text frame,
    a bad opcode...) as a CloseConnection event carrying the RFC 6455 code
    (1007, 1002) but leaves the connection open; hypercorn then drops the TCP
    connection without the close frame, so the client only sees 1006. Marking
    the connection as closed by the peer makes hypercorn send the close frame
    with wsproto's code, as RFC 6455 section 7.1.7 asks.

    The reasons: wsproto's 1007 carried Python's UnicodeDecodeError text ("'utf-8'
    codec can't decode byte 0xff in position 12: invalid start byte"), and
    hypercorn's 1009 (a message over websocket_max_message_size) none; both now say
    what the app says when it closes for the same frame (pulse.streams.messages).
    """
    from hypercorn.protocol import ws_stream
    from wsproto.connection import ConnectionState
    from wsproto.events import CloseConnection
    from wsproto.frame_protocol import CloseReason

    reasons: dict[int, str] = {
        CloseReason.INVALID_FRAME_PAYLOAD_DATA: INVALID_UTF8_REASON,
        CloseReason.MESSAGE_TOO_BIG: MESSAGE_TOO_BIG_REASON,
    }
    base = ws_stream.Connection  # type: ignore[attr-defined]
    if getattr(base, "pulse_closes_protocol_errors", False):
        return

    class _Connection(base):  # type: ignore[misc, valid-type]
        pulse_closes_protocol_errors = True

        def events(self) -> Any:
            for event in super().events():
                if isinstance(event, CloseConnection) and self.state is ConnectionState.OPEN:
                    # Not the client's close (that moved the state): wsproto's own, for
                    # a frame it could not parse.
                    self._state = ConnectionState.REMOTE_CLOSING
                    event = CloseConnection(event.code, reasons.get(event.code, event.reason))
                yield event

        def send(self, event: Any) -> bytes:
            # hypercorn's own 1009 has no reason. The app's closes have theirs, and an
            # answer to a client's close (state REMOTE_CLOSING) echoes the client's.
            if (
                isinstance(event, CloseConnection)
                and event.reason is None
                and self.state is ConnectionState.OPEN
            ):
                event = CloseConnection(event.code, reasons.get(event.code))
            data: bytes = super().send(event)
            return data

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
