"""The HTTP and WebSocket doors: Quart routes that turn requests into calls on the Runtime.

One module per family of routes. ``runtime()`` is how a handler finds what the
process owns; ``pulse.app`` puts it there when serving starts.
"""

from __future__ import annotations

from typing import cast

from quart import Quart, current_app

from pulse.runtime import Runtime

RUNTIME = "pulse"  # the one app.extensions key

API_PREFIX = "/api/"
# On every answer under /api/ (tenant data: devices, alerts, rules, history, exports,
# tickets, and the refusals): kept by no cache, a browser's included, and never
# taken for anything but the type it says. An answer that sets its own Cache-Control
# keeps it (an SSE stream's no-cache).
API_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


def runtime() -> Runtime:
    """The running process's Runtime, inside a request or WebSocket."""
    return cast(Runtime, current_app.extensions[RUNTIME])


def runtime_of(app: Quart) -> Runtime:
    return cast(Runtime, app.extensions[RUNTIME])
