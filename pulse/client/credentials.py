"""The caller's JWT and the callback that renews it."""

from __future__ import annotations

import base64
import inspect
import time
from collections.abc import Awaitable, Callable

import orjson

# Returns a fresh JWT; may be a plain function or a coroutine function.
TokenRefresh = Callable[[], Awaitable[str] | str]

# Renew this long before `exp`, so a reconnect never presents an expired token.
REFRESH_MARGIN_S = 30.0


def token_expiry(token: str) -> float | None:
    """The token's ``exp`` (epoch seconds), read without verification; None if absent."""
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError, AttributeError, orjson.JSONDecodeError):
        return None


class Credentials:
    def __init__(self, token: str | None, refresh: TokenRefresh | None) -> None:
        if token is None and refresh is None:
            raise ValueError("give a token, a refresh callback, or both")
        self._token = token
        self._refresh = refresh

    @property
    def can_refresh(self) -> bool:
        return self._refresh is not None

    async def current(self) -> str:
        """A token to connect with: the current one, renewed first if it is about to expire."""
        if self._token is None or (self.can_refresh and self.seconds_left() < REFRESH_MARGIN_S):
            return await self.refresh()
        return self._token

    async def refresh(self) -> str:
        if self._refresh is None:
            if self._token is None:
                raise ValueError("no token")
            return self._token
        result = self._refresh()
        token = await result if inspect.isawaitable(result) else result
        self._token = str(token)
        return self._token

    def seconds_left(self) -> float:
        """Until the current token expires (infinite when it has no ``exp``)."""
        exp = token_expiry(self._token) if self._token else None
        return float("inf") if exp is None else exp - time.time()
