"""The thin Quart layer over token verification, shared by HTTP routes and WebSocket handlers.

Everything raises ``ApiError``; a WebSocket handler turns it into a close code
with ``websocket_close_code``.
"""

from __future__ import annotations

from typing import Protocol

from quart import has_websocket_context, request, websocket

from pulse.app import runtime
from pulse.auth.access import require_roles, tenant_for
from pulse.auth.errors import AuthError, BadRequest, Forbidden
from pulse.auth.principal import Principal
from pulse.auth.tickets import redeem_ticket
from pulse.errors import ApiError

SESSION_COOKIE = "pulse_session"

# Lets a client that got a 401 know which scheme to use (RFC 6750).
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pulse"'}

_CLOSE_CODES = {400: 4000, 401: 4001, 403: 4003}


class Lookup(Protocol):
    """Headers, cookies or query arguments: anything with ``get``."""

    def get(self, key: str) -> str | None: ...


def find_credential(
    headers: Lookup,
    cookies: Lookup,
    args: Lookup,
    *,
    allow_query: bool,
) -> str | None:
    """The caller's JWT, from the first of: Authorization header, session cookie, query.

    The query is a last resort for clients that cannot set headers (browser
    WebSockets, EventSource): URLs end up in logs, so routes opt in.
    """
    scheme, _, value = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    cookie = cookies.get(SESSION_COOKIE)
    if cookie:
        return cookie
    # The one-time `ticket` parameter (CONTRACT section 7) is accepted next to
    # `token`, after it: it resolves to a Principal through the ticket store
    # rather than the JWT verifier (see authenticate_request).
    query_token = args.get("token") if allow_query else None
    return query_token or None


async def authenticate_request(
    *, allow_query: bool = False, roles: frozenset[str] | None = None
) -> Principal:
    """The verified caller of the current request or WebSocket; ``roles``: any one required."""
    source = websocket if has_websocket_context() else request
    token = find_credential(source.headers, source.cookies, source.args, allow_query=allow_query)
    ticket = source.args.get("ticket") if allow_query and token is None else None
    if token is None and not ticket:
        where = "an Authorization: Bearer header or the pulse_session cookie"
        if allow_query:
            where += ", or the token or ticket query parameter"
        raise ApiError(401, "missing_token", f"Send a token in {where}.", dict(_CHALLENGE))
    try:
        if token is not None:
            principal = await runtime().verifier.verify(token)
        else:
            assert ticket
            principal = await redeem_ticket(runtime().pool, ticket)
        if roles is not None:
            require_roles(principal, roles)
    except AuthError as exc:
        raise ApiError(401, exc.code, exc.detail, dict(_CHALLENGE)) from exc
    except Forbidden as exc:
        raise ApiError(403, exc.code, exc.detail) from exc
    return principal


def request_tenant(principal: Principal) -> str:
    """The tenant the current request or WebSocket acts on (its ``tenant_id`` argument)."""
    source = websocket if has_websocket_context() else request
    try:
        return tenant_for(principal, source.args.get("tenant_id"))
    except BadRequest as exc:
        raise ApiError(400, exc.code, exc.detail) from exc
    except Forbidden as exc:
        raise ApiError(403, exc.code, exc.detail) from exc


def websocket_close_code(error: ApiError) -> int:
    """The CONTRACT section 5 close code for an error raised by the functions above."""
    return _CLOSE_CODES.get(error.status, 1011)
