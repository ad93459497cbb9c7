"""HTTP/2 under hypercorn: a request's body that arrives after its answer, an h2c
upgrade whose settings cannot be used, and streams reset as fast as they are opened.

Applied by ``pulse.serving.tuning`` only under the versions it was written for.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pulse.logs import Throttled

log = logging.getLogger(__name__)
# One line per 10 s for refused upgrades, not one per connection: anyone can send them.
_UNUSABLE_UPGRADE = Throttled(log)
# Streams a client may reset: RESETS_BURST at once, then RESETS_PER_S. Each stream
# costs the server a request (an app task started, then cancelled) and the client a
# frame pair; past this the connection is closed with ENHANCE_YOUR_CALM (the "rapid
# reset" attack, CVE-2023-44487). A browser cancelling requests stays far below.
RESETS_BURST = 200
RESETS_PER_S = 20.0


def tune_h2_protocol() -> None:
    """Acknowledge and drop DATA for a stream hypercorn has closed, instead of dying;
    close an h2c upgrade whose HTTP2-Settings cannot be used, instead of logging it.

    Pulse answers some requests before it has read their body: a body over the
    limit (413), a request without a credential (401). Over HTTP/2 the client may
    still be sending that body when hypercorn has closed the stream, and hypercorn
    0.18 looks the stream up for each DATA frame: a KeyError killed the connection,
    every other stream on it with it, and the client never read the answer
    (pgjones/hypercorn#329; the fixes proposed there are not released). The data
    is acknowledged, so the connection's flow-control window stays open, and
    dropped, as hypercorn already does with the end of such a stream.
    """
    import hypercorn.protocol as protocol
    from h2.errors import ErrorCodes
    from h2.events import DataReceived, StreamReset
    from h2.exceptions import H2Error
    from hypercorn.events import Closed

    base = protocol.H2Protocol  # type: ignore[attr-defined]
    if getattr(base, "pulse_drops_late_data", False):
        return

    class _H2Protocol(base):  # type: ignore[misc, valid-type]
        pulse_drops_late_data = True

        async def initiate(
            self, headers: list[tuple[bytes, bytes]] | None = None, settings: bytes | None = None
        ) -> None:
            # An h2c upgrade whose HTTP2-Settings is not base64 (binascii.Error) or not
            # settings: hypercorn let the error reach asyncio's handler, which logged it
            # with the whole HTTP/1 request attached, credentials and ?ticket= included.
            # The connection is closed instead, with one line.
            try:
                await super().initiate(headers, settings)
            except (ValueError, H2Error) as exc:
                _UNUSABLE_UPGRADE.warning(
                    "closed an h2c upgrade with unusable HTTP2-Settings (%s)", type(exc).__name__
                )
                await self.send(Closed())

        async def _handle_events(self, events: list[Any]) -> None:
            # One at a time: handling an event may close a stream that a later
            # DATA frame of the same read is for.
            for event in events:
                if isinstance(event, DataReceived) and event.stream_id not in self.streams:
                    self.connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                    await self._flush()
                elif (
                    isinstance(event, StreamReset) and event.remote_reset and self._reset_too_fast()
                ):
                    self.connection.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM)
                    await self._flush()
                    await self.send(Closed())
                    return
                else:
                    await super()._handle_events([event])

        def _reset_too_fast(self) -> bool:
            """Take one reset from the connection's allowance; True once it is spent."""
            now = time.monotonic()
            allowance, since = getattr(self, "_pulse_resets", (float(RESETS_BURST), now))
            allowance = min(RESETS_BURST, allowance + (now - since) * RESETS_PER_S) - 1
            self._pulse_resets = (allowance, now)
            return allowance < 0

    protocol.H2Protocol = _H2Protocol  # type: ignore[attr-defined]
