"""POST /api/v1/stream-ticket: trade a JWT for a one-time stream ticket (CONTRACT section 7)."""

from __future__ import annotations

import math

from pydantic import BaseModel
from quart import Blueprint
from quart_schema import security_scheme, tag, validate_response

from pulse.auth.tickets import TICKET_TTL_S, issue_ticket
from pulse.errors import DATABASE_UNAVAILABLE, RATE_LIMITED, ApiError
from pulse.web import openapi, runtime
from pulse.web.auth import authenticate_request

blueprint = Blueprint("stream_ticket", __name__)

# A ticket is a credential: no cache or proxy may keep a copy.
_NO_STORE = {"Cache-Control": "no-store"}


class StreamTicket(BaseModel):
    """A ticket for one stream connection."""

    ticket: str
    expires_in: int


@blueprint.post("/api/v1/stream-ticket")
@tag(["streams"])
@security_scheme(openapi.JWT)
@validate_response(StreamTicket)
@openapi.errors(*openapi.AUTH, RATE_LIMITED, DATABASE_UNAVAILABLE)
async def create_stream_ticket() -> tuple[StreamTicket, int, dict[str, str]]:
    """A ticket for ?ticket= on the stream endpoints: single use, valid 30 s on any process."""
    # Header or cookie only: the point of a ticket is to keep the token out of URLs.
    principal = await authenticate_request()
    rt = runtime()
    wait_s = rt.ticket_limit.acquire((principal.tenant_id, principal.subject))
    if wait_s > 0:
        retry_after = max(1, math.ceil(wait_s))
        raise ApiError(
            RATE_LIMITED,
            f"Stream tickets are asked for too often; retry in {retry_after} s.",
            {"Retry-After": str(retry_after)},
        )
    ticket = await issue_ticket(rt.db, principal)
    return StreamTicket(ticket=ticket, expires_in=TICKET_TTL_S), 200, _NO_STORE
