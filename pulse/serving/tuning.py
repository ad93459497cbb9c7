"""Where Pulse reaches into hypercorn, Quart and wsproto, behind one fence.

Speed and memory with many streams need a few private parts of the server
libraries (``pulse.serving.direct``, ``pulse.serving.inbound``,
``pulse.serving.websocket``):

- direct writes: a stream's bytes written straight to its connection
  (``pulse.web.direct``), instead of one ASGI message per event;
- bounded, small inbound queues (WebSocket handlers read them straight from
  ASGI: ``pulse.web.websocket``);
- a close frame for WebSocket protocol errors (hypercorn drops the connection), and a
  stable reason on the closes for a frame that the WebSocket layer makes itself (1007,
  1009; ``pulse.serving.websocket``);
- a WebSocket ping frame, which ASGI cannot send, offered to the app (the v2
  keepalive; without the tunings hypercorn pings by itself, ``hypercorn_config``);
- permessage-deflate refused (memory per connection, one framing for all);
- h11's checks of a response's headers made once per distinct list
  (``pulse.serving.headers``);
- a connection's idle timeout as a timer, not a task restarted with every
  request (``pulse.serving.idle``);
- HTTP/1.1 only: hypercorn's cleartext HTTP/2 (prior knowledge, ``Upgrade: h2c``)
  has no bound on a stream's buffered output nor on frames that open no stream,
  so it is not spoken (``pulse.serving.http2``);
- the HTTP/1 requests hypercorn refuses itself (400, 431, 501, and 505 for the
  HTTP/2 preface) answered with Pulse's error body (``pulse.serving.protocol_errors``);
- ``100 Continue`` sent when the app first asks for the body, not with the head,
  so that a request refused before its body is read is not sent it
  (``pulse.serving.expect``).

Each was written against the exact versions in ``WRITTEN_FOR``, which
pyproject.toml pins. ``apply`` checks what is installed before touching
anything: with other versions it logs one warning and the app is served the
plain ASGI way, slower but correct. ``PULSE_DIRECT_WRITES=0`` keeps the
tunings but has the handlers send the plain ASGI way (both are tested).
"""

from __future__ import annotations

import logging
from importlib import metadata

log = logging.getLogger(__name__)

WRITTEN_FOR = {"hypercorn": "0.18.0", "quart": "0.22.0", "wsproto": "1.3.2", "h11": "0.16.0"}

_applied: bool | None = None  # the tunings are process-wide: decided once


def mismatches() -> list[str]:
    """The installed versions that differ from those the tunings were written for."""
    found = []
    for package, version in WRITTEN_FOR.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            installed = "none"
        if installed != version:
            found.append(f"{package} {installed} (written for {version})")
    return found


def apply() -> bool:
    """Apply the tunings, when the versions match (once); True if they apply."""
    global _applied
    if _applied is None:
        differ = mismatches()
        if differ:
            log.warning(
                "serving the plain ASGI way, without Pulse's server tunings: %s",
                ", ".join(differ),
            )
            _applied = False
        else:
            from pulse.serving.direct import bound_inbound_queues, offer_direct_writes
            from pulse.serving.expect import continue_when_asked
            from pulse.serving.headers import memoize_header_checks
            from pulse.serving.http2 import refuse_http2
            from pulse.serving.idle import time_idle_connections
            from pulse.serving.protocol_errors import answer_protocol_errors_with_a_body
            from pulse.serving.websocket import close_protocol_errors_properly, refuse_compression

            offer_direct_writes()
            bound_inbound_queues()
            close_protocol_errors_properly()
            refuse_compression()
            memoize_header_checks()
            time_idle_connections()
            refuse_http2()
            answer_protocol_errors_with_a_body()
            continue_when_asked()
            _applied = True
    return _applied
