"""What the middlewares in front of Quart share: the ASGI types, a door for one route,
and a request's query as Quart's ``args.get`` reads it.

A request the door ``takes`` is served by its ``_serve`` straight from ASGI;
every other request goes on to ``inner`` (Quart) untouched.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ClassVar, cast
from urllib.parse import parse_qsl

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


def query_args(query: bytes) -> dict[str, str]:
    """A query string's parameters; one given more than once has its values joined by
    commas: ``device_id=d1&device_id=d2`` (as HTTP libraries send a list) is the list
    ``d1,d2``, where a single value given twice is then refused as malformed, instead of
    its first value taken and the rest silently ignored.

    A plain dict: werkzeug's MultiDict raises and catches an exception for every
    parameter asked for and absent, most of them on a stream's URL.
    """
    args: dict[str, str] = {}
    for name, value in parse_qsl(
        query.decode(), keep_blank_values=True, errors="werkzeug.url_quote"
    ):
        args[name] = f"{args[name]},{value}" if name in args else value
    return args


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of the request header ``name`` (lower case, as ASGI gives names)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin1")  # type: ignore[no-any-return]
    return None
