"""Request bodies parsed as JSON by Quart (quart-schema's ``validate_request``) go through orjson.

The standard library's parser recurses once per nesting level: a body of
100,000 ``[`` raised RecursionError, a 500. orjson stops at 1024 levels with a
JSONDecodeError (a ValueError), which Quart answers as a 400 like any other
malformed body. It also refuses what JSON forbids and the standard library
accepts (NaN, Infinity, lone surrogates, which PostgreSQL could not store).
Responses are encoded as before, by the provider quart-schema installs.
"""

from __future__ import annotations

from typing import Any

import orjson
from quart import Quart, Response
from quart.json.provider import JSONProvider


class OrjsonBodies(JSONProvider):
    def __init__(self, app: Quart, encoder: JSONProvider) -> None:
        super().__init__(app)
        self._encoder = encoder

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return self._encoder.dumps(obj, **kwargs)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        return self._encoder.response(*args, **kwargs)  # type: ignore[return-value]


def parse_bodies_with_orjson(app: Quart) -> None:
    """After QuartSchema(app), which installs its own provider for responses."""
    app.json = OrjsonBodies(app, app.json)
