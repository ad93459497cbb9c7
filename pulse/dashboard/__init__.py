"""The built-in dashboard: one page at ``/`` and its static files. No build step.

The page holds no credentials of its own. It takes a JWT once (pasted, or
from a ``#token=`` URL fragment, which browsers never send to a server),
keeps it in the tab's sessionStorage, calls the REST API with an
Authorization header, and opens its streams with one-time tickets
(POST /api/v1/stream-ticket) so that the token never appears in a URL.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, send_from_directory
from quart_schema import hide

STATIC = Path(__file__).parent / "static"

blueprint = Blueprint(
    "dashboard", __name__, static_folder="static", static_url_path="/dashboard/static"
)

# Scripts and styles from this origin only, connections (fetch, EventSource,
# WebSocket) to this origin only, and no framing: a page that holds a token
# must not run anyone else's code or be embedded by anyone else.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@blueprint.get("/")
@hide  # a page, not API: not in /openapi.json
async def index() -> Response:
    response = await send_from_directory(STATIC, "index.html")
    response.headers.update(SECURITY_HEADERS)
    return response
