from __future__ import annotations


class AuthError(Exception):
    """A token or ticket was missing, invalid or expired (HTTP 401, WS 4001)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class Forbidden(Exception):
    """A valid identity that may not do this (HTTP 403, WS 4003)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
