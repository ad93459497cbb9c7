"""What can go wrong in identifying a caller, independent of HTTP or WebSocket.

Each carries a machine ``code`` and a human ``detail``; the web layer maps the
type to a status (HTTP) or close code (WebSocket).
"""

from __future__ import annotations


class _CodedError(Exception):
    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class AuthError(_CodedError):
    """A token or ticket was missing, invalid or expired (HTTP 401, WS 4001)."""


class Forbidden(_CodedError):
    """A valid identity that may not do this (HTTP 403, WS 4003)."""


class BadRequest(_CodedError):
    """The caller named a tenant wrongly or not at all (HTTP 400, WS 4000)."""
