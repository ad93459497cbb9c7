"""POST /api/v1/stream-ticket: trade a JWT for a one-time stream ticket (CONTRACT section 7).

The common request, a token in a header or cookie and no body, is answered
before Quart by ``pulse.web.ticket_fastpath``, through ``grant`` and
``ticket_body`` as here.
"""

from __future__ import annotations

import math
import time

import orjson
from pydantic import BaseModel
from quart import Blueprint, Response
from quart_schema import document_response, security_scheme, tag

from pulse.auth.access import require_unexpired
from pulse.auth.principal import Principal
from pulse.auth.tickets import TICKET_TTL_S
from pulse.errors import DATABASE_UNAVAILABLE, ORIGIN_NOT_ALLOWED, RATE_LIMITED, ApiError
from pulse.runtime import Runtime
from pulse.web import openapi, runtime
from pulse.web.auth import authenticate_request

blueprint = Blueprint("stream_ticket", __name__)

TICKET_URL = "/api/v1/stream-ticket"
# A ticket is a credential: no cache or proxy may keep a copy.
NO_STORE = {"Cache-Control": "no-store"}


class StreamTicket(BaseModel):
    """A ticket for one stream connection."""

    ticket: str
    expires_in: int


async def grant(rt: Runtime, principal: Principal) -> str:
    """A new ticket for ``principal``, within its rate of tickets; raises rate_limited,
    or token_expired for a token past its ``exp`` (the ticket would expire at birth)."""
    require_unexpired(principal)
    wait_s = rt.ticket_limit.acquire((principal.tenant_id, principal.subject))
    if wait_s > 0:
        retry_after = max(1, math.ceil(wait_s))
        raise ApiError(
            RATE_LIMITED,
            f"Stream tickets are asked for too often; retry in {retry_after} s.",
            {"Retry-After": str(retry_after)},
        )
    return await rt.tickets.issue(principal)


def ticket_body(ticket: str, principal: Principal) -> bytes:
    """The JSON answer, a ``StreamTicket``: a ticket expires with its token, if that
    comes first (whole seconds, rounded down)."""
    left_s = int(principal.expires_at.timestamp() - time.time())
    return orjson.dumps({"ticket": ticket, "expires_in": max(0, min(TICKET_TTL_S, left_s))})


@blueprint.post(TICKET_URL)
@tag(["streams"])
@security_scheme(openapi.JWT)
@document_response(StreamTicket)
@openapi.errors(*openapi.AUTH, ORIGIN_NOT_ALLOWED, RATE_LIMITED, DATABASE_UNAVAILABLE)
async def create_stream_ticket() -> Response:
    """A ticket for ?ticket= on the stream endpoints: single use, valid 30 s on any process."""
    # Header or cookie only: the point of a ticket is to keep the token out of URLs.
    principal = await authenticate_request()
    ticket = await grant(runtime(), principal)
    return Response(ticket_body(ticket, principal), 200, NO_STORE, content_type="application/json")
