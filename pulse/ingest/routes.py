"""Ingest HTTP API (to be written)."""

from __future__ import annotations

from quart import Blueprint

blueprint = Blueprint("ingest", __name__)
