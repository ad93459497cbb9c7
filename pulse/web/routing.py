"""Routing that never redirects.

werkzeug answers a path with ``//`` (merged into ``/``) or without the
trailing slash of a rule with a redirect to an absolute URL built from the
request's ``Host`` header: ``/api//v1/...`` with ``Host: evil.example`` was
sent to ``http://evil.example/api/v1/...``, a gift to cache poisoning and
phishing behind a proxy that passes Host on. Pulse's routes need no
redirect: such a path is simply not found. Slashes are strict: ``/healthz/`` is
another path than ``/healthz``, not found (a strict rule that ends in ``/``
would redirect the path without it; no rule but the root does).
"""

from __future__ import annotations

from typing import Any

from quart import Quart
from quart.routing import QuartMap


class NoRedirectMap(QuartMap):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(merge_slashes=False, strict_slashes=True, redirect_defaults=False)
        super().__init__(*args, **kwargs)


class PulseQuart(Quart):
    url_map_class = NoRedirectMap
