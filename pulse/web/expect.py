"""Quart asks for a body that waits for ``100 Continue`` only when a handler reads it.

The server sends ``100 Continue`` when the app first calls ``receive()``
(``pulse.serving.expect``). Quart calls it at once, in a task of its own, for every
request, whatever its handler does: the 100 went before the JWT was checked, and
before a declared length over the limit was refused. ``AskForTheBodyWhenRead``, in
front of Quart, holds that first call, for a request with
``Expect: 100-continue`` only, until the request's body is read (``Body``, Pulse's
requests' body): a request refused first (401, 403, 413 for a declared length over
the limit, which Quart raises without reading) is answered without the 100, and its
client does not send the body (RFC 9110, section 10.1.1).

Only a request that has a body (``Content-Length`` over 0, or ``Transfer-Encoding``)
is held. Quart learns that its client left only through that first ``receive()``
(``http.disconnect``, which cancels the handler): held, a request whose handler
never reads a body (a GET export sent with ``Expect: 100-continue``) streamed on into
a closed connection, holding its export slot, until it ended. A request with a body
that its handler never reads is still held: it is answered at once in Pulse (refused
first), and has nothing to stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from typing import Any

from quart.wrappers.request import Body as QuartBody

from pulse.web.asgi import ASGIReceiveCallable, ASGISendCallable, Scope

# Where a request's scope holds the call that lets the first receive() through.
ASK = "pulse.ask_for_body"


def expects_continue(scope: Scope) -> bool:
    """An HTTP/1.1 request with a body whose client waits for ``100 Continue`` to send it."""
    if scope.get("http_version") != "1.1":
        return False
    expect = has_body = False
    for name, value in scope["headers"]:
        if name == b"expect":
            expect = expect or value.strip().lower() == b"100-continue"
        elif name == b"transfer-encoding":
            has_body = True
        elif name == b"content-length":
            has_body = has_body or value.strip().lstrip(b"0") != b""
    return expect and has_body


class AskForTheBodyWhenRead:
    """ASGI middleware in front of Quart: see the module."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Awaitable[None]:
        if scope["type"] == "http" and expects_continue(scope):
            asked = asyncio.Event()
            scope[ASK] = asked.set

            async def receive_once_asked() -> Any:
                await asked.wait()
                return await receive()

            return self._inner(scope, receive_once_asked, send)  # type: ignore[no-any-return]
        return self._inner(scope, receive, send)  # type: ignore[no-any-return]


class Body(QuartBody):
    """Quart's request body, which asks for the bytes (``ASK``) when it is first read,
    unless it is refused without them (a declared length over the limit)."""

    ask: Callable[[], None] | None = None

    def _asked(self) -> None:
        if self.ask is not None and self._must_raise is None:
            self.ask()
            self.ask = None

    def __await__(self) -> Generator[Any, None, Any]:
        self._asked()
        return super().__await__()

    async def __anext__(self) -> bytes:
        self._asked()
        return await super().__anext__()
