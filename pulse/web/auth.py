"""Who is calling, for HTTP routes and WebSocket handlers alike: credentials, roles, tenant.

Token verification itself has no web framework in it (``pulse.auth``); this is
the thin Quart layer that finds the credential in a request and names the
tenant acted on. Everything raises ``ApiError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol
from urllib.parse import urlsplit

from quart import g, has_websocket_context, request, websocket
from werkzeug.http import parse_cookie

from pulse.auth.access import require_roles, require_write, tenant_for
from pulse.auth.principal import ADMIN_ROLES, Principal
from pulse.errors import MISSING_TOKEN, ORIGIN_NOT_ALLOWED, ApiError
from pulse.runtime import Runtime
from pulse.web import runtime
from pulse.web.asgi import Scope, header

SESSION_COOKIE = "pulse_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": ":80", "https": ":443"}

_NO_COOKIES: dict[str, str] = {}

# Lets a client that got a 401 know which scheme to use (RFC 6750).
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pulse"'}


class Lookup(Protocol):
    """Headers, cookies or query arguments: anything with ``get``."""

    def get(self, key: str) -> str | None: ...


class Credential(NamedTuple):
    token: str
    source: str  # "header", "cookie" or "query"


def find_credential(
    headers: Lookup,
    cookies: Lookup,
    args: Lookup,
    *,
    allow_query: bool,
) -> Credential | None:
    """The caller's JWT, from the first of: Authorization header, session cookie, query.

    The query is a last resort for clients that cannot set headers (browser
    WebSockets, EventSource): URLs end up in logs, so routes opt in.
    """
    scheme, _, value = (headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return Credential(value.strip(), "header")
    cookie = cookies.get(SESSION_COOKIE)
    if cookie:
        return Credential(cookie, "cookie")
    # The one-time `ticket` parameter (CONTRACT section 7) is accepted next to
    # `token`, after it: it resolves to a Principal through the ticket store
    # rather than the JWT verifier (see authenticate_request).
    query_token = args.get("token") if allow_query else None
    return Credential(query_token, "query") if query_token else None


def is_allowed_origin(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a page at ``origin`` may make changes with the session cookie.

    The page's own origin always may: the one whose host and port are those the
    request was sent to (its Host header, which a page cannot set for another
    site). Otherwise only an origin in PULSE_ALLOWED_ORIGINS. A browser sends
    Origin with every POST and DELETE; a request without one (or with the
    opaque ``null``) is refused, since the cookie is a browser's credential.
    """
    if not origin or origin == "null":
        return False
    if "*" in allowed or origin.rstrip("/").lower() in {o.rstrip("/").lower() for o in allowed}:
        return True
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in _DEFAULT_PORTS or not parts.netloc or not host:
        return False
    return _authority(parts.netloc, parts.scheme) == _authority(host, parts.scheme)


def _authority(netloc: str, scheme: str) -> str:
    netloc = netloc.lower()
    return netloc.removesuffix(_DEFAULT_PORTS[scheme])


def _check_cookie_origin(credential: Credential | None) -> None:
    """Cross-site request forgery: a change authenticated by the session cookie (which
    the browser attaches to requests from any site) must come from an allowed page."""
    if credential is None or credential.source != "cookie" or has_websocket_context():
        return
    if request.method in SAFE_METHODS:
        return
    origin = request.headers.get("Origin")
    if not is_allowed_origin(origin, request.headers.get("Host"), _allowed_origins()):
        raise ApiError(
            ORIGIN_NOT_ALLOWED,
            f"A change authenticated by the {SESSION_COOKIE} cookie must come from this "
            "server's own pages or an origin in PULSE_ALLOWED_ORIGINS; send the token in an "
            "Authorization header instead.",
        )


def _allowed_origins() -> tuple[str, ...]:
    return runtime().settings.allowed_origins


async def authenticate_request(
    *,
    allow_query: bool = False,
    roles: frozenset[str] | None = None,
    accept: Callable[[Principal], object] = lambda _: None,
) -> Principal:
    """The verified caller of the current request or WebSocket; ``roles``: any one required.

    ``accept`` checks the rest of the request against the caller (its tenant) and
    raises to refuse it; a stream ticket is spent only once it has accepted.
    """
    source = websocket if has_websocket_context() else request
    credential = find_credential(
        source.headers, source.cookies, source.args, allow_query=allow_query
    )
    _check_cookie_origin(credential)
    return await authenticate(
        runtime(), credential, source.args if allow_query else None, roles=roles, accept=accept
    )


async def authenticate(
    rt: Runtime,
    credential: Credential | None,
    args: Lookup | None,
    *,
    roles: frozenset[str] | None = None,
    accept: Callable[[Principal], object] = lambda _: None,
) -> Principal:
    """The caller with ``credential`` or, without one, the one-time ``ticket`` in ``args``
    (None: a request whose query carries no credential), as ``authenticate_request``."""
    token = None if credential is None else credential.token
    ticket = args.get("ticket") if args is not None and token is None else None
    try:
        if token is None and not ticket:
            where = "an Authorization: Bearer header or the pulse_session cookie"
            if args is not None:
                where += ", or the token or ticket query parameter"
            raise ApiError(MISSING_TOKEN, f"Send a token in {where}.")

        def checked(principal: Principal) -> None:
            if roles is not None:
                require_roles(principal, roles)
            accept(principal)

        if token is not None:
            principal = await rt.verifier.verify(token)
            checked(principal)
        else:
            assert ticket
            principal = await rt.tickets.redeem(ticket, checked)
    except ApiError as exc:
        if exc.status == 401:
            exc.headers.update(_CHALLENGE)
        raise
    return principal


def scope_credential(scope: Scope, args: Lookup, *, allow_query: bool) -> Credential | None:
    """``find_credential`` for a request read straight from ASGI (the doors before Quart)."""
    cookie = header(scope, b"cookie")
    return find_credential(
        {"Authorization": header(scope, b"authorization")},
        parse_cookie(_as_utf8(cookie)) if cookie else _NO_COOKIES,
        args,
        allow_query=allow_query,
    )


def _as_utf8(header_value: str) -> str:
    """A header read as latin-1 whose bytes are valid UTF-8, as werkzeug's ``parse_cookie``
    takes it: a byte that is not (another site's cookie, say) becomes U+FFFD, instead of
    the decoding error that made every WebSocket of such a browser fail with 1011."""
    text = header_value.encode("latin1").decode("utf-8", "replace")
    return text.encode().decode("latin1")


def request_tenant(principal: Principal) -> str:
    """The tenant the current request or WebSocket acts on (its ``tenant_id`` argument).
    Given twice, its values are joined (as ``query_args`` does), which no tenant id is:
    refused, rather than the first taken and the other ignored."""
    source = websocket if has_websocket_context() else request
    return tenant_for(principal, ",".join(source.args.getlist("tenant_id")) or None)


async def authorize(*, cross_tenant_reads: bool = False) -> None:
    """A blueprint's ``before_request``: the caller in ``g.principal``, the tenant in
    ``g.tenant_id`` (None: every tenant, for an operator's read where allowed).

    Reads serve any role; changes need an admin role. Runs before body
    validation, so a caller without the right to write is told 401/403 rather
    than how to fix a body it may not send.
    """
    writes = request.method not in ("GET", "HEAD", "OPTIONS")
    principal = await authenticate_request(roles=ADMIN_ROLES if writes else None)
    g.principal = principal
    if cross_tenant_reads and not writes and principal.is_operator:
        named = any(request.args.getlist("tenant_id"))  # any value: given twice is refused
        g.tenant_id = request_tenant(principal) if named else None
    else:
        g.tenant_id = request_tenant(principal)
    if writes:
        require_write(principal, g.tenant_id)


def scope() -> str | None:
    """The tenant acted on (``authorize``); None: every tenant (an operator's read)."""
    tenant: str | None = g.tenant_id
    return tenant


def tenant() -> str:
    """The one tenant acted on (``authorize``)."""
    acted_on = scope()
    assert acted_on is not None
    return acted_on


def principal() -> Principal:
    caller: Principal = g.principal
    return caller
