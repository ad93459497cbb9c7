"""Ingest HTTP API (CONTRACT section 3): a device's readings and heartbeats, and batches.

The device URLs are answered here, or before Quart by ``pulse.web.fastpath``
for the common small request; both turn requests into ``pulse.ingest.intake``
items, hand them to the Runtime's ``Ingest`` and answer with ``reply``, so a
reading gets the same answer whichever way it came in.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

import orjson
from quart import Blueprint, Response, request
from quart_schema import document_request, document_response, security_scheme, tag_blueprint
from werkzeug.exceptions import RequestEntityTooLarge

from pulse.errors import (
    DATABASE_UNAVAILABLE,
    INVALID_DEVICE_TOKEN,
    INVALID_PAYLOAD,
    PAYLOAD_TOO_LARGE,
    RATE_LIMITED,
    REQUEST_TIMEOUT,
    SERVER_BUSY,
    UNKNOWN_DEVICE,
    error_body,
)
from pulse.ingest import intake
from pulse.ingest.model import Accepted, Outcome, Rejected
from pulse.ingest.service import Receipt
from pulse.web import openapi, runtime
from pulse.web.errors import error_for

blueprint = Blueprint("ingest", __name__)
tag_blueprint(blueprint, ["ingest"])

# `path` converters so that an id holding an (encoded) slash reaches validation
# and is refused as invalid_payload instead of matching no route at all.
INGEST_PREFIX = "/ingest/"  # every ingest route (pulse.web.fastpath reads their bodies)
DEVICE_URL = "/ingest/v1/tenant/<path:tenant_id>/device/<path:device_id>"
# The same URLs, as the fast path matches them (a raw ASGI path; no slash in an id).
DEVICE_PATH = re.compile(
    re.escape(DEVICE_URL)
    .replace(re.escape("<path:tenant_id>"), "([^/]+)")
    .replace(re.escape("<path:device_id>"), "([^/]+)")
    + "/(telemetry|heartbeat)"
)
TOKEN_HEADER = intake.TOKEN_HEADER
BATCH_URL = "/ingest/v1/batch"

# What a device's reading or heartbeat may be answered with, in the order checked.
DEVICE_ERRORS = (
    PAYLOAD_TOO_LARGE,
    REQUEST_TIMEOUT,
    INVALID_PAYLOAD,
    INVALID_DEVICE_TOKEN,
    UNKNOWN_DEVICE,
    RATE_LIMITED,
    SERVER_BUSY,  # the process's budget for unfinished bodies is full (pulse.web.bodies)
    DATABASE_UNAVAILABLE,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer: status, JSON body (None: no body) and extra headers."""

    status: int
    body: bytes | None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def reply(outcome: Outcome) -> Reply:
    """The answer to one message: 201 with its id, 204 for a heartbeat, or the error."""
    if isinstance(outcome, Rejected):
        headers: dict[str, str] = {}
        if outcome.reason is RATE_LIMITED:
            headers["Retry-After"] = str(max(1, math.ceil(outcome.retry_after_s)))
        status = outcome.reason.status or 400
        return Reply(status, error_body(outcome.reason, outcome.detail), headers)
    if outcome.event_id is None:
        return Reply(204, None)
    return Reply(201, orjson.dumps({"id": outcome.event_id}))


def batch_reply(outcomes: Sequence[Outcome]) -> Reply:
    """The answer to a batch: 200 with a result per message, or 400 when none was accepted."""
    results = [
        {"index": i, "status": "accepted", "id": outcome.event_id}
        if isinstance(outcome, Accepted)
        else {"index": i, "status": "rejected", "reason": outcome.reason.code}
        for i, outcome in enumerate(outcomes)
    ]
    rejected = sum(isinstance(outcome, Rejected) for outcome in outcomes)
    summary = {"accepted": len(outcomes) - rejected, "rejected": rejected, "results": results}
    # When to resend the rate_limited ones: the longest wait among them.
    waits = [o.retry_after_s for o in outcomes if isinstance(o, Rejected) and o.retry_after_s]
    headers = {"Retry-After": str(max(1, math.ceil(max(waits))))} if waits else {}
    # orjson: a thousand results take the standard library's encoder a while.
    return Reply(200 if rejected < len(outcomes) else 400, orjson.dumps(summary), headers)


def error_reply(exc: Exception) -> Reply:
    """The answer to a request that raised ``exc``, as Quart's error handlers give it."""
    error = error_for(exc)
    return Reply(error.status, error_body(error.error, error.detail), error.headers)


@blueprint.post(DEVICE_URL + "/telemetry")
@security_scheme(openapi.DEVICE_TOKEN)
@document_request(openapi.ReadingBody)
@document_response(openapi.EventId, 201)
@openapi.errors(*DEVICE_ERRORS)
async def telemetry(tenant_id: str, device_id: str) -> Response:
    """Store one reading of a device."""
    receipt = Receipt("telemetry")
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
@security_scheme(openapi.DEVICE_TOKEN)
@openapi.answers(204, "Seen; nothing is stored and the body is empty.")
@openapi.errors(*DEVICE_ERRORS)
async def heartbeat(tenant_id: str, device_id: str) -> Response:
    """Mark a device as seen (ONLINE); any body is ignored and nothing is stored."""
    receipt = Receipt("heartbeat")
    # The body is optional and ignored, but still read so that size limits hold.
    body = await _read_body()
    item = (
        body
        if isinstance(body, Rejected)
        else intake.heartbeat(tenant_id, device_id, request.headers.get(TOKEN_HEADER))
    )
    [outcome] = await _ingest([item], receipt)
    return _respond(outcome)


@blueprint.post(BATCH_URL)
@document_request(openapi.BatchBody)
@document_response(openapi.BatchResponse, 200)
@document_response(openapi.BatchResponse, 400)
# The envelope (not JSON, no messages, 0 or over 1000 of them) is answered with one
# error; a message's own error is its result's reason.
@openapi.errors(
    INVALID_PAYLOAD, REQUEST_TIMEOUT, PAYLOAD_TOO_LARGE, SERVER_BUSY, DATABASE_UNAVAILABLE
)
async def batch() -> Response:
    """Store 1 to 1000 readings of any devices and tenants, each judged on its own."""
    receipt = Receipt("batch")
    body = await _read_body()
    items = body if isinstance(body, Rejected) else intake.batch(body, receipt.at)
    if isinstance(items, Rejected):
        # The envelope itself is wrong: one error body, not per-message results.
        [outcome] = await _ingest([items], receipt)
        return _respond(outcome)
    return _respond_with(batch_reply(await _ingest(items, receipt)))


async def _read_body() -> bytes | Rejected:
    try:
        # Quart counts the bytes as they arrive, so a chunked body with no
        # Content-Length is cut off at the limit too.
        return await request.get_data(cache=False, as_text=False, parse_form_data=False)
    except RequestEntityTooLarge:
        return Rejected(PAYLOAD_TOO_LARGE, PAYLOAD_TOO_LARGE.meaning)


async def _ingest(items: Sequence[intake.Item], receipt: Receipt) -> list[Outcome]:
    rt = runtime()
    try:
        return await rt.ingest(items, receipt)
    except Exception as exc:  # answered by the app's error handlers; counted here
        rt.metrics.ingest_failed.labels(error_for(exc).error.code).inc()
        raise


def _respond(outcome: Outcome) -> Response:
    return _respond_with(reply(outcome))


def _respond_with(answer: Reply) -> Response:
    if answer.body is None:
        empty = Response(status=answer.status, headers=answer.headers)
        del empty.headers["Content-Type"]  # nothing to describe
        return empty
    return Response(answer.body, answer.status, answer.headers, content_type="application/json")
