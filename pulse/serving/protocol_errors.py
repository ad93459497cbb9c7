"""HTTP/1 requests hypercorn refuses before the app sees them, answered with Pulse's error
body. Applied by ``pulse.serving.tuning`` only under the versions it was written for."""

from __future__ import annotations

import asyncio
import contextlib
from itertools import chain
from typing import Any

from pulse.errors import (
    BAD_REQUEST,
    DATABASE_UNAVAILABLE,
    HEADERS_TOO_LARGE,
    HTTP_ERROR,
    error_body,
)

_DETAILS = {
    400: (BAD_REQUEST, "The request is not valid HTTP/1.1 (its request line or headers)."),
    431: (HEADERS_TOO_LARGE, None),
    # h11's hint for a Transfer-Encoding other than chunked.
    501: (HTTP_ERROR, "Transfer-Encoding other than chunked is not supported."),
    # The HTTP/2 preface (pulse.serving.http2).
    505: (HTTP_ERROR, "Pulse speaks HTTP/1.1 only (WebSocket and SSE included)."),
}


def answer_protocol_errors_with_a_body() -> None:
    """Give hypercorn's own refusals the contract's ``{"error", "detail"}`` body.

    h11 refuses a request it cannot parse (a malformed or repeated Content-Length,
    a bad request line: 400), whose head outgrows its buffer (a 100 KB cookie:
    431) or whose Transfer-Encoding it does not know (501), and hypercorn answered
    with an empty body, which a client cannot tell from a proxy's. The status and
    ``Connection: close`` stay as they were; a status other than 400 is never
    ``bad_request``, which the catalogue ties to 400.
    """
    import h11
    import hypercorn.protocol as protocol

    base = protocol.H11Protocol  # type: ignore[attr-defined]
    if getattr(base, "pulse_answers_protocol_errors", False):
        return

    class _H11Protocol(base):  # type: ignore[misc, valid-type]
        pulse_answers_protocol_errors = True

        async def _send_error_response(self, status_code: int) -> None:
            error, detail = _DETAILS.get(status_code, (HTTP_ERROR, None))
            body = error_body(error, detail)
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"connection", b"close"),
            ]
            await self._send_h11_event(
                h11.Response(
                    status_code=status_code,
                    headers=list(chain(headers, self.config.response_headers("h11"))),
                )
            )
            await self._send_h11_event(h11.Data(data=body))
            await self._send_h11_event(h11.EndOfMessage())

    protocol.H11Protocol = _H11Protocol  # type: ignore[attr-defined]


# A request the shutdown's time cut before it was answered (its body still arriving,
# say): hypercorn answered it an empty 500, which a device takes for a failure of its
# own and drops the reading (a review, 8 December). It is the server's stop: 503, as
# ingest answers one, with its Retry-After.
_CUT = error_body(
    DATABASE_UNAVAILABLE,
    "The server is shutting down and stopped this request before answering it; retry shortly.",
)
_CUT_HEAD = {
    "type": "http.response.start",
    "status": 503,
    "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(_CUT)),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ],
}
_CUT_BODY = {"type": "http.response.body", "body": _CUT}
CUT_ANSWER_S = 1.0  # at most: a client that does not read gets the close instead


async def answer_cut(send: Any) -> None:
    """Answer an HTTP request whose app was cancelled, unless it has begun its answer:
    ``send`` is hypercorn's ``HTTPStream.app_send`` (its stream's state says)."""
    from hypercorn.protocol.http_stream import ASGIHTTPState

    stream = getattr(send, "__self__", None)
    if stream is None or stream.closed or stream.state is not ASGIHTTPState.REQUEST:
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CUT_ANSWER_S):
            await send(_CUT_HEAD)
            await send(_CUT_BODY)
