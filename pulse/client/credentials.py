"""The caller's JWT and the callback that renews it."""

from __future__ import annotations

import base64
import inspect
import time
import unicodedata
from collections.abc import Awaitable, Callable

import orjson

from pulse.client.errors import AuthenticationFailed

# Returns a fresh JWT; may be a plain function or a coroutine function.
TokenRefresh = Callable[[], Awaitable[str] | str]

# Renew this long before `exp`, so a reconnect never presents an expired token.
REFRESH_MARGIN_S = 30.0

# What a token may hold: printable ASCII, no space. A JWT is three base64url parts
# joined by dots, and an Authorization header's value can carry no control character:
# httpx and websockets refuse such a header before sending it, and their errors, which
# the streams took for a lost connection and retried for ever, quote the whole header.
_FIRST, _LAST = "\x21", "\x7e"
_CALLED = {"\r": "a carriage return", "\n": "a line feed", "\t": "a tab", " ": "a space"}


def clean_token(token: object, source: str = "the token") -> str:
    """``token`` without the whitespace around it (the newline at the end of a file,
    the carriage return of a CRLF .env file), or ValueError when what is left cannot be
    a token. ``source`` names where it came from, for the message, which never holds
    the token itself: it ends up on stderr, in logs and in bug reports."""
    if not isinstance(token, str):
        raise ValueError(f"{source} is a {type(token).__name__}, not a str")
    stripped = token.strip()
    if not stripped:
        raise ValueError(f"{source} is empty")
    for position, char in enumerate(stripped, 1):
        if not _FIRST <= char <= _LAST:
            raise ValueError(
                f"{source} holds {_called(char)} at character {position} of "
                f"{len(stripped)}: a token is printable ASCII without spaces (a JWT: "
                "three base64url parts joined by dots). Is it one token, whole?"
            )
    return stripped


def _called(char: str) -> str:
    """A character a token cannot hold, named (never the token around it)."""
    if char in _CALLED:
        name = _CALLED[char]
    elif unicodedata.category(char) == "Cc":
        name = "a control character"
    else:
        name = "a non-ASCII character"
    return f"{name} (U+{ord(char):04X})"


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
    """The token every request and stream sends, and the way to a new one.

    A token is cleaned where it comes in (``clean_token``): given here, a malformed
    one is a ValueError at once; from the refresh callback, AuthenticationFailed
    (status 0: no server saw it), which no stream retries.
    """

    def __init__(self, token: str | None, refresh: TokenRefresh | None) -> None:
        if token is None and refresh is None:
            raise ValueError("give a token, a refresh callback, or both")
        self._token = None if token is None else clean_token(token)
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
        try:
            self._token = clean_token(token, "the token refresh_token returned")
        except ValueError as exc:
            # Asking the callback again would not help: it answered, wrongly.
            raise AuthenticationFailed(0, "invalid_token", str(exc)) from None
        return self._token

    def seconds_left(self) -> float:
        """Until the current token expires (infinite when it has no ``exp``)."""
        exp = token_expiry(self._token) if self._token else None
        return float("inf") if exp is None else exp - time.time()
