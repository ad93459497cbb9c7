"""What the middlewares in front of Quart share: the ASGI types, and a door for one route.

A request the door ``takes`` is served by its ``_serve`` straight from ASGI;
every other request goes on to ``inner`` (Quart) untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, cast

from quart import Quart

Scope = dict[str, Any]
ASGIReceiveCallable = Callable[[], Awaitable[dict[str, Any]]]
ASGISendCallable = Callable[[dict[str, Any]], Awaitable[None]]


class OneRoute:
    """ASGI middleware: an HTTP request for ``method`` and ``path`` (with no root path)
    that ``takes`` accepts is served by ``_serve``; the rest goes on to ``inner``."""

    method: ClassVar[str]
    path: ClassVar[str]

    def __init__(self, app: Quart, inner: Any) -> None:
        self._app = app
        self._inner = inner

    def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Coroutine[Any, Any, None]:
        # Not a coroutine itself: a request handed on to Quart (a stream, for as long
        # as it is open) keeps no frame of this call alive.
        if (
            scope["type"] == "http"
            and scope["method"] == self.method
            and scope["path"] == self.path
            and not scope.get("root_path")
            and self.takes(scope)
        ):
            return self._serve(scope, receive, send)
        return cast(Coroutine[Any, Any, None], self._inner(scope, receive, send))

    def takes(self, scope: Scope) -> bool:
        """Whether this door serves the request, beyond its method and path."""
        return True

    async def _serve(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        raise NotImplementedError
