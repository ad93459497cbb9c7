"""HTTP/1 requests hypercorn refuses before the app sees them, answered with Pulse's error
body. Applied by ``pulse.serving.tuning`` only under the versions it was written for."""

from __future__ import annotations

from itertools import chain

from pulse.errors import BAD_REQUEST, HEADERS_TOO_LARGE, HTTP_ERROR, error_body

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
