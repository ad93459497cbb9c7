"""HTTP/2 under hypercorn: a request's body that arrives after its answer.

Applied by ``pulse.serving.tuning`` only under the versions it was written for.
"""

from __future__ import annotations

from typing import Any


def drop_data_after_the_answer() -> None:
    """Acknowledge and drop DATA for a stream hypercorn has closed, instead of dying.

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
    from h2.events import DataReceived

    base = protocol.H2Protocol  # type: ignore[attr-defined]
    if getattr(base, "pulse_drops_late_data", False):
        return

    class _H2Protocol(base):  # type: ignore[misc, valid-type]
        pulse_drops_late_data = True

        async def _handle_events(self, events: list[Any]) -> None:
            # One at a time: handling an event may close a stream that a later
            # DATA frame of the same read is for.
            for event in events:
                if isinstance(event, DataReceived) and event.stream_id not in self.streams:
                    self.connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                    await self._flush()
                else:
                    await super()._handle_events([event])

    protocol.H2Protocol = _H2Protocol  # type: ignore[attr-defined]
