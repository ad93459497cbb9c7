"""Ingest HTTP API (CONTRACT section 3): a device's readings and heartbeats, and batches."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
from quart import Blueprint, Response, current_app, request
from quart_schema import document, tag_blueprint
from werkzeug.exceptions import RequestEntityTooLarge

from pulse.ingest import intake, openapi
from pulse.ingest.handling import Receipt, ingest, reply
from pulse.ingest.model import PAYLOAD_TOO_LARGE, Accepted, Outcome, Rejected

blueprint = Blueprint("ingest", __name__)
tag_blueprint(blueprint, ["ingest"])

# `path` converters so that an id holding an (encoded) slash reaches validation
# and is refused as invalid_payload instead of matching no route at all.
DEVICE_URL = "/ingest/v1/tenant/<path:tenant_id>/device/<path:device_id>"
TOKEN_HEADER = "X-Provision-Token"


@blueprint.post(DEVICE_URL + "/telemetry")
@document(
    request=openapi.ReadingBody,
    headers=openapi.ProvisionTokenHeader,
    responses={201: (openapi.EventId, None), **openapi.DEVICE_ERRORS},
)
async def telemetry(tenant_id: str, device_id: str) -> Response:
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
@document(
    headers=openapi.ProvisionTokenHeader,
    responses={204: (openapi.NoContent, None), **openapi.DEVICE_ERRORS},
)
async def heartbeat(tenant_id: str, device_id: str) -> Response:
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
    receipt = Receipt("batch")
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


async def _ingest(items: Sequence[intake.Item], receipt: Receipt) -> list[Outcome]:
    return await ingest(current_app, items, receipt)


def _respond(outcome: Outcome) -> Response:
    answer = reply(outcome)
    if answer.body is None:
        empty = Response(status=answer.status, headers=answer.headers)
        del empty.headers["Content-Type"]  # nothing to describe
        return empty
    return Response(answer.body, answer.status, answer.headers, content_type="application/json")


def _result(index: int, outcome: Outcome) -> dict[str, object]:
    if isinstance(outcome, Rejected):
        return {"index": index, "status": "rejected", "reason": outcome.reason}
    return {"index": index, "status": "accepted", "id": outcome.event_id}
