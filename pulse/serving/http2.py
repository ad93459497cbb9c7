"""HTTP/2 is not served: HTTP/1.1 only.

hypercorn speaks HTTP/2 in cleartext to anyone who asks (the prior-knowledge
preface, or ``Upgrade: h2c``), and its 0.18 HTTP/2 has no bound where Pulse needs
one (the protocol abuse audit, 7 December 2026):

- a stream's output is buffered whole while the client's flow-control window is
  closed: three unauthenticated connections asking 100 times each for the API
  reference's 1.7 MB script held 586 MB, never given back;
- so a stream's sends never block, and an SSE stream whose client reads nothing is
  never cut as ``lagging``: its events pile up in that buffer instead of its
  bounded queue (50 such streams: 345 MB more per 8,000 events);
- frames that open no stream (PRIORITY, SETTINGS, unknown types) are handled one by
  one with no budget: one connection made every other client's ``/healthz`` take
  0.5-0.8 s, four made it 3-4 s.

Pulse terminates no TLS, so no browser speaks HTTP/2 to it: behind a platform's
router or a TLS proxy, HTTP/2 ends at the proxy, which speaks HTTP/1.1 to Pulse.
An ``Upgrade: h2c`` is ignored (RFC 9110 §7.8 lets a server): the request is
answered in HTTP/1.1. The prior-knowledge preface is answered ``505`` with Pulse's
error body and the connection closed. Applied by ``pulse.serving.tuning`` only
under the versions it was written for (without the tunings, hypercorn's HTTP/2
is served as it is).
"""

from __future__ import annotations

from typing import Any

HTTP2_PREFACE = (b"PRI", b"*", b"2.0")  # the preface's request line, as h11 reads it


def refuse_http2() -> None:
    """Serve every connection in HTTP/1.1, whatever it asks for."""
    import hypercorn.protocol as protocol
    from hypercorn.events import Closed

    base = protocol.H11Protocol  # type: ignore[attr-defined]
    if getattr(base, "pulse_refuses_http2", False):
        return

    class _H11Protocol(base):  # type: ignore[misc, valid-type]
        pulse_refuses_http2 = True

        async def _check_protocol(self, event: Any) -> None:
            """hypercorn switched to HTTP/2 here, for ``Upgrade: h2c`` or the preface."""

        async def _create_stream(self, request: Any) -> None:
            if (request.method, request.target, request.http_version) == HTTP2_PREFACE:
                await self._send_error_response(505)
                await self.send(Closed())
                return
            await super()._create_stream(request)

    protocol.H11Protocol = _H11Protocol  # type: ignore[attr-defined]
