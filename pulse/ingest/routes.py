"""Ingest HTTP API (CONTRACT section 3): a device's readings and heartbeats, and batches."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

import orjson
from quart import Blueprint, Response, current_app, jsonify, request
from quart_schema import document, tag_blueprint
from werkzeug.exceptions import RequestEntityTooLarge

from pulse.app import runtime
from pulse.errors import error_response
from pulse.ingest import intake, openapi
from pulse.ingest.model import (
    INVALID_DEVICE_TOKEN,
    INVALID_PAYLOAD,
    PAYLOAD_TOO_LARGE,
    RATE_LIMITED,
    UNKNOWN_DEVICE,
    Accepted,
    Outcome,
    Rejected,
    Submission,
)
from pulse.ingest.ratelimit import Admission, RateLimiter
from pulse.ingest.writer import TelemetryWriter

blueprint = Blueprint("ingest", __name__)
tag_blueprint(blueprint, ["ingest"])

# `path` converters so that an id holding an (encoded) slash reaches validation
# and is refused as invalid_payload instead of matching no route at all.
DEVICE_URL = "/ingest/v1/tenant/<path:tenant_id>/device/<path:device_id>"
TOKEN_HEADER = "X-Provision-Token"

STATUS = {
    INVALID_PAYLOAD: 400,
    INVALID_DEVICE_TOKEN: 401,
    UNKNOWN_DEVICE: 404,
    PAYLOAD_TOO_LARGE: 413,
    RATE_LIMITED: 429,
}

_WRITER = "pulse.ingest.writer"


def ingest_writer() -> TelemetryWriter:
    """This app's writer, built on first use: the pool exists only once the app is serving."""
    extensions = current_app.extensions
    writer = extensions.get(_WRITER)
    if writer is None:
        rt = runtime()
        settings = rt.settings
        admit = Admission(
            per_device=RateLimiter(
                settings.ingest_rate_per_device, settings.ingest_burst_per_device
            ),
            per_tenant=RateLimiter(
                settings.ingest_rate_per_tenant, settings.ingest_burst_per_tenant
            ),
        )
        writer = extensions[_WRITER] = TelemetryWriter(
            rt.pool, admit=admit, group_commit=settings.group_commit
        )
    return cast(TelemetryWriter, writer)


class _Receipt:
    """When the request arrived: the wall clock for readings, a monotonic one for latency."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.at = datetime.now(UTC)
        self._started = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._started


@blueprint.post(DEVICE_URL + "/telemetry")
@document(
    request=openapi.ReadingBody,
    headers=openapi.ProvisionTokenHeader,
    responses={201: (openapi.EventId, None), **openapi.DEVICE_ERRORS},
)
async def telemetry(tenant_id: str, device_id: str) -> Response:
    receipt = _Receipt("telemetry")
    body = await _read_body()
    item = (
        body
        if isinstance(body, Rejected)
        else intake.reading(
            tenant_id, device_id, request.headers.get(TOKEN_HEADER), body, receipt.at
        )
    )
    [outcome] = await _ingest([item], receipt)
    return _respond(outcome)


@blueprint.post(DEVICE_URL + "/heartbeat")
@document(
    headers=openapi.ProvisionTokenHeader,
    responses={204: (openapi.NoContent, None), **openapi.DEVICE_ERRORS},
)
async def heartbeat(tenant_id: str, device_id: str) -> Response:
    receipt = _Receipt("heartbeat")
    # The body is optional and ignored, but still read so that size limits hold.
    body = await _read_body()
    item = (
        body
        if isinstance(body, Rejected)
        else intake.heartbeat(tenant_id, device_id, request.headers.get(TOKEN_HEADER))
    )
    [outcome] = await _ingest([item], receipt)
    return _respond(outcome)


@blueprint.post("/ingest/v1/batch")
@document(
    request=openapi.BatchBody,
    responses={
        200: (openapi.BatchResponse, None),
        400: (openapi.BatchResponse, None),
        413: (openapi.Error, None),
    },
)
async def batch() -> Response:
    receipt = _Receipt("batch")
    body = await _read_body()
    items = body if isinstance(body, Rejected) else intake.batch(body, receipt.at)
    if isinstance(items, Rejected):
        # The envelope itself is wrong: one error body, not per-message results.
        [outcome] = await _ingest([items], receipt)
        return _respond(outcome)
    outcomes = await _ingest(items, receipt)
    accepted = sum(isinstance(outcome, Accepted) for outcome in outcomes)
    summary = {
        "accepted": accepted,
        "rejected": len(outcomes) - accepted,
        "results": [_result(i, outcome) for i, outcome in enumerate(outcomes)],
    }
    # orjson: a thousand results take the standard library's encoder a while.
    return Response(
        orjson.dumps(summary), status=200 if accepted else 400, content_type="application/json"
    )


async def _read_body() -> bytes | Rejected:
    try:
        # Quart counts the bytes as they arrive, so a chunked body with no
        # Content-Length is cut off at the limit too.
        return await request.get_data(cache=False, as_text=False, parse_form_data=False)
    except RequestEntityTooLarge:
        return Rejected(PAYLOAD_TOO_LARGE, "The request body is over 1 MiB.")


async def _ingest(items: Sequence[intake.Item], receipt: _Receipt) -> list[Outcome]:
    """The one path from parsed messages to outcomes, for every endpoint."""
    decided: dict[int, Outcome] = {
        i: item for i, item in enumerate(items) if isinstance(item, Rejected)
    }
    pending = [(i, item) for i, item in enumerate(items) if isinstance(item, Submission)]
    if pending:
        written = await ingest_writer().write([submission for _, submission in pending])
        decided.update(zip([i for i, _ in pending], written, strict=True))
    outcomes = [decided[i] for i in range(len(items))]
    _record(outcomes, receipt)
    return outcomes


def _record(outcomes: Sequence[Outcome], receipt: _Receipt) -> None:
    metrics = runtime().metrics
    rows = sum(isinstance(o, Accepted) and o.event_id is not None for o in outcomes)
    for outcome in outcomes:
        if isinstance(outcome, Rejected):
            metrics.ingest_rejected.labels(outcome.reason).inc()
    if rows:
        metrics.ingest_rows.labels(receipt.endpoint).inc(rows)
    if any(isinstance(o, Accepted) for o in outcomes):
        metrics.ingest_latency.labels(receipt.endpoint).observe(receipt.elapsed_s())


def _respond(outcome: Outcome) -> Response:
    if isinstance(outcome, Rejected):
        headers: dict[str, str] = {}
        if outcome.reason == RATE_LIMITED:
            headers["Retry-After"] = str(max(1, math.ceil(outcome.retry_after_s)))
        return error_response(STATUS[outcome.reason], outcome.reason, outcome.detail, headers)
    if outcome.event_id is None:
        return Response(status=204)
    response = jsonify({"id": outcome.event_id})
    response.status_code = 201
    return response


def _result(index: int, outcome: Outcome) -> dict[str, object]:
    if isinstance(outcome, Rejected):
        return {"index": index, "status": "rejected", "reason": outcome.reason}
    return {"index": index, "status": "accepted", "id": outcome.event_id}
