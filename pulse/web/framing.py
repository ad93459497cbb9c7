"""Requests whose length is stated twice are refused, and their connection closed.

A request with both ``Content-Length`` and ``Transfer-Encoding`` is read by
the server by the one and perhaps by a proxy in front of it by the other: the
rest of the bytes then pass for a second request that the proxy never saw
(request smuggling). RFC 9112 (section 6.1) lets a server refuse it, and
requires it to close the connection after answering, whatever it does.
hypercorn served it (by Transfer-Encoding) and kept the connection open.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from pulse.errors import BAD_REQUEST, error_body
from pulse.web import API_HEADERS
from pulse.web.asgi import ASGIReceiveCallable, ASGISendCallable, Scope

_DETAIL = (
    "The request has both Content-Length and Transfer-Encoding; send one of them "
    "(RFC 9112, section 6.1)."
)


class RefuseAmbiguousLength:
    """ASGI middleware: 400 and ``Connection: close`` for such a request over HTTP/1."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Awaitable[None]:
        if (
            scope["type"] == "http"
            and scope.get("http_version") in ("1.0", "1.1")
            and _has_both(scope["headers"])
        ):
            return _refuse(send)
        return self._inner(scope, receive, send)  # type: ignore[no-any-return]


def _has_both(headers: list[tuple[bytes, bytes]]) -> bool:
    names = {name for name, _ in headers}
    return b"content-length" in names and b"transfer-encoding" in names


async def _refuse(send: ASGISendCallable) -> None:
    body = error_body(BAD_REQUEST, _DETAIL)
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                # As every answer under /api/ (pulse.app): any path may be refused here.
                *((name.lower().encode(), value.encode()) for name, value in API_HEADERS.items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
