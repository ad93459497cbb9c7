"""The API documentation page at ``/docs``: Swagger UI on /openapi.json, served from here.

Swagger UI's files are vendored in ``static/vendor`` (swagger-ui-dist, Apache-2.0;
``swagger-ui.VERSION`` says which and how to update), so the page works without
internet access and loads no code from anyone else. quart-schema's own page
loads them from a CDN and starts them with an inline script; this one starts
them with ``static/docs.js``, so its Content-Security-Policy allows scripts
from this origin only and no inline script at all, as the dashboard's does.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response, send_from_directory
from quart_schema import hide

STATIC = Path(__file__).parent / "static"

blueprint = Blueprint("apidocs", __name__, static_folder="static", static_url_path="/docs/static")

# Same origin only, nothing inline, no framing. Images: Swagger UI's icons are
# data: URIs in its stylesheet. Connections: the document, and "Try it out".
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


@blueprint.get("/docs")
@hide
async def docs() -> Response:
    response = await send_from_directory(STATIC, "docs.html")
    response.headers.update(SECURITY_HEADERS)
    return response
