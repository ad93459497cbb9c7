"""Health, readiness, status and metrics."""

from __future__ import annotations

from quart import Blueprint

blueprint = Blueprint("ops", __name__)


@blueprint.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
