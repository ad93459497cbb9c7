"""JWT verification (CONTRACT section 1): pure, no web framework.

``TokenVerifier.verify`` turns a compact JWT into a ``Principal`` or raises
``ApiError`` (invalid_token, token_expired: 401; forbidden: 403).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ExpiredTokenError,
    InvalidClaimError,
    JoseError,
    MissingClaimError,
)
from joserfc.jwk import Key, KeySet, OctKey
from joserfc.jwt import ClaimsOption, JWTClaimsRegistry

from pulse.auth.jwks import JwksCache, JwksUnavailable
from pulse.auth.principal import KNOWN_ROLES, OPERATOR_ROLES, Principal
from pulse.config import Settings
from pulse.errors import FORBIDDEN, INVALID_TOKEN, KEYS_UNAVAILABLE, TOKEN_EXPIRED, ApiError
from pulse.logs import Throttled
from pulse.names import is_plain_text, is_valid_id

log = logging.getLogger(__name__)

LEEWAY_S = 30
SECRET_ALGORITHMS = ("HS256",)
# With a JWKS, HMAC is never accepted: a verifier that did would take the
# provider's *public* key as an HMAC secret (algorithm confusion).
JWKS_ALGORITHMS = ("RS256", "ES256")
# A token without kid is tried against at most this many keys of its algorithm.
MAX_KEYS_WITHOUT_KID = 3
# The keys that can sign for each of them: type and curve.
_KEY_TYPES = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}


class TokenVerifier:
    def __init__(
        self,
        *,
        secret: str | None = None,
        jwks: JwksCache | None = None,
        issuer: str | None = None,
        audience: str | None = None,
    ) -> None:
        self._jwks = jwks
        self._unavailable = Throttled(log)  # a line per 10 s of a provider's outage
        # A configured JWKS wins over the secret, so one deployment never
        # accepts both kinds of token.
        self._secret_key = OctKey.import_key(secret) if secret and jwks is None else None
        self._algorithms = JWKS_ALGORITHMS if jwks is not None else SECRET_ALGORITHMS
        # An empty option still type-checks the claim when present, but requires nothing.
        iss: ClaimsOption = {"essential": True, "value": issuer} if issuer else {}
        aud: ClaimsOption = {"essential": True, "value": audience} if audience else {}
        self._claims = JWTClaimsRegistry(leeway=LEEWAY_S, exp={"essential": True}, iss=iss, aud=aud)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        return cls(
            secret=settings.jwt_secret,
            jwks=JwksCache(settings.jwks_url) if settings.jwks_url else None,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )

    async def verify(self, token: str) -> Principal:
        header = _header(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise ApiError(INVALID_TOKEN, f"Tokens signed with {alg!r} are not accepted.")
        key = await self._key_for(header)
        if isinstance(key, KeySet) and header.get("kid") is None:
            claims = self._decode_with_any(token, key, alg)
        else:
            claims = self._decode(token, key)
        self._check_claims(claims)
        return principal_from_claims(claims)

    def _decode_with_any(self, token: str, keys: KeySet, alg: str) -> dict[str, Any]:
        """The claims of a token that names no key (no ``kid``), signed by any key of the
        JWKS that can sign for its algorithm: joserfc takes the only key of a set, but
        refuses a set of more (a provider's keys during a rotation, an RSA and an EC
        key). Each key is tried for its own algorithm only: of its type (and curve), and
        a key that declares an ``alg`` for that one alone; and only when there are at most
        MAX_KEYS_WITHOUT_KID such keys: anyone can send a token without ``kid``, and each
        key tried is a signature check (16 keys: 20x a token naming its key)."""
        kty, crv = _KEY_TYPES[alg]
        candidates = [
            key
            for key in keys
            if key.key_type == kty
            and (crv is None or key.get("crv") == crv)
            and (key.alg is None or key.alg == alg)
        ]
        if len(candidates) > MAX_KEYS_WITHOUT_KID:
            raise ApiError(
                INVALID_TOKEN,
                f"The token names no key (kid) and the identity provider has "
                f"{len(candidates)} keys for {alg}: a token must name its key.",
            )
        for key in candidates:
            try:
                return self._decode(token, key)
            except _BadSignature:
                continue
        raise _BadSignature(INVALID_TOKEN, "The token's signature is not valid.")

    def _decode(self, token: str, key: Key | KeySet) -> dict[str, Any]:
        try:
            return jwt.decode(token, key, algorithms=self._algorithms).claims
        except BadSignatureError as exc:
            raise _BadSignature(INVALID_TOKEN, "The token's signature is not valid.") from exc
        except (JoseError, ValueError) as exc:
            raise ApiError(INVALID_TOKEN, "The token's signature is not valid.") from exc
        except TypeError as exc:
            # joserfc's, for a header of the wrong shape (a "crit" that is no list of
            # names), raised before the signature is looked at.
            raise ApiError(INVALID_TOKEN, "The token's header is not valid.") from exc
        except RecursionError as exc:
            # joserfc reads the claims with the standard library's json once the signature
            # is verified, and that recursion ends around 1000 levels: claims nested deeper
            # (a signed token from a misbehaving or compromised issuer) were a 500.
            raise ApiError(INVALID_TOKEN, "The token's claims are nested too deeply.") from exc

    async def _key_for(self, header: Mapping[str, Any]) -> OctKey | KeySet:
        if self._jwks is not None:
            kid = header.get("kid")
            try:
                return await self._jwks.keys_for(kid if isinstance(kid, str) else None)
            except JwksUnavailable as exc:
                # Not the token's fault: a 401 would send a dashboard to its sign-in.
                self._unavailable.warning("%s", exc)
                raise ApiError(
                    KEYS_UNAVAILABLE,
                    "The identity provider's signing keys cannot be fetched; retry shortly.",
                    {"Retry-After": "5"},
                ) from exc
        if self._secret_key is None:
            raise ApiError(INVALID_TOKEN, "This server has no token verification configured.")
        return self._secret_key

    def _check_claims(self, claims: dict[str, Any]) -> None:
        try:
            self._claims.validate(claims)
        except ExpiredTokenError as exc:
            raise ApiError(TOKEN_EXPIRED, "The token has expired.") from exc
        except MissingClaimError as exc:
            raise ApiError(INVALID_TOKEN, f"The token lacks the claim {exc.claim}.") from exc
        except InvalidClaimError as exc:
            raise ApiError(INVALID_TOKEN, f"The token's {exc.claim} is not accepted.") from exc


class _BadSignature(ApiError):
    """invalid_token for a signature that this key did not make (another may have)."""


def _header(token: str) -> dict[str, Any]:
    """The protected header, read before verification only to choose the key: the first
    of the token's three parts alone (``jwt.decode`` then reads the whole token)."""
    encoded = token.partition(".")[0]
    try:
        if token.count(".") != 2:
            raise ValueError("a compact JWS has three parts")
        header = orjson.loads(base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)))
    except ValueError as exc:  # binascii.Error and orjson's errors are ValueErrors
        raise ApiError(INVALID_TOKEN, "The token is not a well-formed JWT.") from exc
    if not isinstance(header, dict):
        raise ApiError(INVALID_TOKEN, "The token is not a well-formed JWT.")
    return header


def principal_from_claims(claims: Mapping[str, Any]) -> Principal:
    """Map verified claims to Pulse's identity; raises Forbidden for a token Pulse cannot use."""
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise ApiError(INVALID_TOKEN, "The token has no numeric exp claim.")
    roles = _roles(claims)
    if not roles:
        raise ApiError(
            FORBIDDEN,
            "The token carries none of the roles " + ", ".join(sorted(KNOWN_ROLES)) + ".",
        )
    tenant = None
    if not roles & OPERATOR_ROLES:
        tenant = tenant_claim(claims)
        if tenant is None:
            raise ApiError(
                FORBIDDEN, "The token names no tenant (claim organization or tenant_id)."
            )
        if not is_valid_id(tenant):
            raise ApiError(
                FORBIDDEN,
                "The token's tenant is not a valid tenant id (1 to 64 of [A-Za-z0-9_.:-], "
                'not "." nor "..", which no URL can carry).',
            )
    sub = claims.get("sub")
    subject = sub if isinstance(sub, str) else ""
    # The subject is stored (tickets, who acknowledged an alert): PostgreSQL refuses NUL.
    if not is_plain_text(subject):
        raise ApiError(INVALID_TOKEN, "The token's sub contains control or invisible characters.")
    try:
        expires_at = datetime.fromtimestamp(exp, UTC)
    except (OverflowError, ValueError, OSError):
        raise ApiError(INVALID_TOKEN, "The token's exp is beyond the year 9999.") from None
    return Principal(subject=subject, tenant_id=tenant, roles=roles, expires_at=expires_at)


def tenant_claim(claims: Mapping[str, Any]) -> str | None:
    """Claim ``organization`` (a string; a dict: its first key; a list: its first
    non-empty string), falling back to claim ``tenant_id``."""
    organization = claims.get("organization")
    if isinstance(organization, str) and organization:
        return organization
    # Keycloak sends a list of names, or a dict keyed by name when it adds attributes.
    names: Iterable[Any] = ()
    if isinstance(organization, dict):
        names = list(organization)[:1]
    elif isinstance(organization, list):
        names = organization
    for name in names:
        if isinstance(name, str) and name:
            return name
    tenant_id = claims.get("tenant_id")
    return tenant_id if isinstance(tenant_id, str) and tenant_id else None


def _roles(claims: Mapping[str, Any]) -> frozenset[str]:
    realm_access = claims.get("realm_access")
    realm_roles = realm_access.get("roles") if isinstance(realm_access, dict) else None
    found: set[str] = set()
    for roles in (realm_roles, claims.get("roles")):
        if isinstance(roles, list):
            found.update(role for role in roles if isinstance(role, str))
    return frozenset(found & KNOWN_ROLES)
