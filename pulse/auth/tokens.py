"""JWT verification: pure, no web framework. (Minimal HS256 version; JWKS to come.)"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from pulse.auth.errors import AuthError
from pulse.auth.principal import KNOWN_ROLES, Principal
from pulse.config import Settings

LEEWAY_S = 30


class TokenVerifier:
    def __init__(self, secret: str | None) -> None:
        self._key = OctKey.import_key(secret) if secret else None

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        return cls(settings.jwt_secret)

    async def verify(self, token: str) -> Principal:
        if self._key is None:
            raise AuthError("invalid_token", "No token verification is configured.")
        try:
            decoded = jwt.decode(token, self._key, algorithms=["HS256"])
        except (JoseError, ValueError) as exc:
            raise AuthError("invalid_token", "The token could not be verified.") from exc
        return principal_from_claims(decoded.claims)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    exp = claims.get("exp")
    if not isinstance(exp, int | float):
        raise AuthError("invalid_token", "The token has no exp claim.")
    if exp + LEEWAY_S < time.time():
        raise AuthError("token_expired", "The token has expired.")
    roles = set(claims.get("roles") or []) & KNOWN_ROLES
    tenant = claims.get("organization") or claims.get("tenant_id")
    return Principal(
        subject=str(claims.get("sub", "")),
        tenant_id=tenant if isinstance(tenant, str) else None,
        roles=frozenset(roles),
        expires_at=datetime.fromtimestamp(exp, UTC),
    )
