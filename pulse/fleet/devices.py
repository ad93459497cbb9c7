"""Device management API (to be written)."""

from __future__ import annotations

from quart import Blueprint

blueprint = Blueprint("devices", __name__)
