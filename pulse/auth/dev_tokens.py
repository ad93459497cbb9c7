"""Development tokens signed with the HS256 secret (`pulse token`, the demo, tests)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from joserfc import jwt
from joserfc.jwk import OctKey


def mint_token(
    secret: str,
    *,
    tenant_id: str | None,
    roles: Iterable[str] = ("customer",),
    lifetime_s: float = 3600,
    subject: str = "dev-user",
    **extra: Any,
) -> str:
    claims: dict[str, Any] = {
        "sub": subject,
        "roles": list(roles),
        "iat": int(time.time()),
        "exp": int(time.time() + lifetime_s),
        **extra,
    }
    if tenant_id is not None:
        claims["tenant_id"] = tenant_id
    return jwt.encode({"alg": "HS256"}, claims, OctKey.import_key(secret))
