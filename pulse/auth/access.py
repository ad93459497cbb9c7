"""Who may act on which tenant, and with which roles (CONTRACT section 1). Pure."""

from __future__ import annotations

import time

from pulse.auth.principal import OPERATOR_ADMIN, TENANT_ADMIN, Principal
from pulse.errors import FORBIDDEN, INVALID_TENANT_ID, TENANT_REQUIRED, TOKEN_EXPIRED, ApiError
from pulse.names import is_valid_id


def tenant_for(principal: Principal, requested: str | None) -> str:
    """The tenant a request acts on, given its ``tenant_id`` query parameter (or None).

    An empty parameter counts as absent: clients fill URL templates like
    ``...&tenant_id=`` whether or not they name a tenant.
    """
    requested = requested or None
    # Not "." nor "..": a device made in such a tenant could post nothing (pulse.names).
    if requested is not None and not is_valid_id(requested):
        raise ApiError(
            INVALID_TENANT_ID,
            'tenant_id must be 1 to 64 characters of [A-Za-z0-9_.:-], other than "." and "..".',
        )
    if principal.is_operator:
        if requested is None:
            raise ApiError(
                TENANT_REQUIRED, "Operators must name a tenant with the tenant_id parameter."
            )
        return requested
    if principal.tenant_id is None:
        raise ApiError(FORBIDDEN, "The token names no tenant.")
    if requested is not None and requested != principal.tenant_id:
        raise ApiError(FORBIDDEN, "The token does not grant access to that tenant.")
    return principal.tenant_id


def require_write(principal: Principal, tenant_id: str) -> None:
    """May ``principal`` change ``tenant_id``? ``operator-admin`` may change any tenant;
    ``tenant-admin`` only its own, whatever other roles come with it. (A token with
    ``operator``, which may name any tenant, and ``tenant-admin`` of its own tenant
    could change every tenant: the security audit's finding.)"""
    if OPERATOR_ADMIN in principal.roles:
        return
    if TENANT_ADMIN in principal.roles and principal.tenant_id == tenant_id:
        return
    if principal.is_operator:  # its tenant claim is not read: it has no tenant of its own
        raise ApiError(FORBIDDEN, "An operator's token changes a tenant only with operator-admin.")
    raise ApiError(
        FORBIDDEN,
        "tenant-admin changes only its own tenant; another tenant's changes need operator-admin.",
    )


def require_roles(principal: Principal, allowed: frozenset[str]) -> None:
    if not principal.roles & allowed:
        raise ApiError(FORBIDDEN, "This needs one of the roles " + ", ".join(sorted(allowed)) + ".")


def require_unexpired(principal: Principal) -> None:
    """Refuse a token already past its ``exp`` for what lasts until then: a stream, a
    stream ticket. The verifier's leeway (clock skew) lets single requests take such a
    token, but a stream opened with it would be closed at once, and an EventSource would
    reconnect with it again and again (a 401 stops it). Said in the catalogue's words,
    which are all a WebSocket's close (reason: the code) can carry: a client says the
    same for either transport."""
    if principal.expires_at.timestamp() <= time.time():
        raise ApiError(TOKEN_EXPIRED)
