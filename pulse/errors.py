"""Every error Pulse answers with, once: its code, HTTP status, WebSocket close code, meaning.

Code anywhere raises ``ApiError(CODE, detail)``; the web layer is the one place
that turns it into bytes: ``{"error": "<code>", "detail": "<sentence>"}`` with the
code's status over HTTP, or the code's close code with the code as reason over a
WebSocket (but ``message_too_big``: RFC 6455's own 1009, which the WebSocket layer
may send before the app sees the frame, carries a sentence, the same whoever sends
it: pulse.streams.messages). The error table in docs/protocol.md is generated from
this catalogue (``python -m pulse.errors``), and a test fails when the two differ.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable

import orjson

# WebSocket close codes (RFC 6455 section 7.4, and Pulse's own 4000-4999).
NORMAL_CLOSURE = 1000
MESSAGE_TOO_BIG_CLOSE = 1009
INTERNAL_ERROR_CLOSE = 1011
SERVICE_RESTART = 1012


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorCode:
    """One machine-readable error: ``status`` over HTTP and ``close`` over a WebSocket
    (None where the error never travels that way), and what it means."""

    code: str
    status: int | None
    close: int | None
    meaning: str

    def __str__(self) -> str:
        return self.code


CATALOGUE: dict[str, ErrorCode] = {}


def _error(code: str, status: int | None, close: int | None, meaning: str) -> ErrorCode:
    assert code not in CATALOGUE, code
    error = CATALOGUE[code] = ErrorCode(code, status, close, meaning)
    return error


# -- the request or message itself ----------------------------------------------------
INVALID_PAYLOAD = _error(
    "invalid_payload",
    400,
    None,
    "The body (or one message of a batch) is not valid: not JSON, or not the documented shape.",
)
INVALID_PARAMETER = _error(
    "invalid_parameter", 400, 4000, "A query parameter (filter, position, page) is not valid."
)
TENANT_REQUIRED = _error(
    "tenant_required", 400, 4000, "Operators must name a tenant with the tenant_id parameter."
)
INVALID_TENANT_ID = _error(
    "invalid_tenant_id", 400, 4000, "tenant_id must be 1 to 64 characters of [A-Za-z0-9_.:-]."
)
BAD_REQUEST = _error("bad_request", 400, 4000, "The request is malformed.")
PAYLOAD_TOO_LARGE = _error(
    "payload_too_large",
    413,
    None,
    "The request body is over its route's limit: 1 MiB for ingest, 64 KiB for the others.",
)
HEADERS_TOO_LARGE = _error(
    "headers_too_large",
    431,
    None,
    "The request line and headers are too large: over 16 KiB while they are still "
    "arriving (a head sent in one piece may reach 64 KiB).",
)
MESSAGE_TOO_BIG = _error(
    "message_too_big", None, MESSAGE_TOO_BIG_CLOSE, "An inbound WebSocket message is over 64 KiB."
)

# -- who is calling ---------------------------------------------------------------------
MISSING_TOKEN = _error("missing_token", 401, 4001, "No token or ticket was sent.")
INVALID_TOKEN = _error(
    "invalid_token", 401, 4001, "The token is malformed, forged, or not accepted here."
)
TOKEN_EXPIRED = _error(
    "token_expired", 401, 4001, "The token has expired (or did while connected)."
)
INVALID_TICKET = _error(
    "invalid_ticket", 401, 4001, "The stream ticket is unknown, already used or expired."
)
UNAUTHORIZED = _error("unauthorized", 401, 4001, "The request needs credentials.")
INVALID_DEVICE_TOKEN = _error(
    "invalid_device_token", 401, None, "The device's provision token is missing or wrong."
)
FORBIDDEN = _error("forbidden", 403, 4003, "The role or the tenant is not allowed to do this.")
ORIGIN_NOT_ALLOWED = _error(
    "origin_not_allowed",
    403,
    4003,
    "The page's origin is not in PULSE_ALLOWED_ORIGINS (nor, for a change made with the "
    "session cookie, this server's own).",
)

# -- what the request names ---------------------------------------------------------------
NOT_FOUND = _error("not_found", 404, None, "There is no such route.")
UNKNOWN_DEVICE = _error("unknown_device", 404, None, "There is no such device in this tenant.")
UNKNOWN_ALERT = _error("unknown_alert", 404, None, "There is no such alert in this tenant.")
UNKNOWN_RULE = _error("unknown_rule", 404, None, "There is no such rule in this tenant.")
METHOD_NOT_ALLOWED = _error("method_not_allowed", 405, None, "The route does not take this method.")
DEVICE_EXISTS = _error("device_exists", 409, None, "A device with this id already exists.")
TENANT_QUOTA = _error(
    "tenant_quota",
    409,
    None,
    "The tenant has as many devices (PULSE_MAX_DEVICES_PER_TENANT) or alert rules "
    "(PULSE_MAX_RULES_PER_TENANT) as allowed; delete some first.",
)
ALERT_CLOSED = _error(
    "alert_closed", 409, None, "The alert is closed; it can no longer be acknowledged."
)

# -- limits and time -----------------------------------------------------------------------
REQUEST_TIMEOUT = _error(
    "request_timeout", 408, None, "The request body did not arrive within 60 s."
)
RATE_LIMITED = _error(
    "rate_limited",
    429,
    None,
    "The device or tenant sends faster than its ingest rate limit, or the caller asks for "
    "stream tickets faster than its limit.",
)
CONNECTION_LIMIT = _error(
    "connection_limit", 429, 4029, "The tenant's (or this server's) stream connection limit."
)
EXPORT_LIMIT = _error(
    "export_limit",
    429,
    None,
    "The tenant (or this server) streams as many history exports at once as it allows; "
    "retry when one has ended.",
)
HISTORY_LIMIT = _error(
    "history_limit",
    429,
    None,
    "The tenant (or this server) reads and sends as many history answers at once as it "
    "allows; retry shortly.",
)
LAGGING = _error(
    "lagging", None, 4008, "The client read too slowly and was cut; reconnect and resume."
)

# -- the server --------------------------------------------------------------------------
INTERNAL_ERROR = _error(
    "internal_error", 500, INTERNAL_ERROR_CLOSE, "The server failed; retry with backoff."
)
SERVER_BUSY = _error(
    "server_busy",
    503,
    None,
    "The server holds as many unfinished ingest bodies as it allows "
    "(PULSE_INGEST_BUFFER_MB); retry shortly.",
)
DATABASE_UNAVAILABLE = _error(
    "database_unavailable",
    503,
    INTERNAL_ERROR_CLOSE,
    "The database is unreachable, or did not answer in time, or the server is shutting "
    "down; retry shortly.",
)
KEYS_UNAVAILABLE = _error(
    "keys_unavailable",
    503,
    INTERNAL_ERROR_CLOSE,
    "The identity provider's signing keys (PULSE_JWKS_URL) cannot be fetched, so no "
    "token can be checked: the token may well be valid. Retry shortly.",
)
BROKER_UNAVAILABLE = _error(
    "broker_unavailable",
    503,
    None,
    "The MQTT broker is unreachable, so a device's MQTT credentials cannot be changed; "
    "nothing was changed. Retry shortly.",
)
SERVER_RESTARTING = _error(
    "server_restarting", None, SERVICE_RESTART, "The server is shutting down; reconnect and resume."
)
HTTP_ERROR = _error(
    "http_error", None, None, "Any other HTTP error, with the status the HTTP layer chose."
)


class ApiError(Exception):
    """An error to answer with: its catalogue entry, a sentence for people, extra headers.

    ``status`` overrides the entry's HTTP status (only for HTTP_ERROR, which
    carries the status of an error raised by the HTTP layer itself).
    """

    def __init__(
        self,
        error: ErrorCode,
        detail: str | None = None,
        headers: dict[str, str] | None = None,
        *,
        status: int | None = None,
    ) -> None:
        super().__init__(detail or error.meaning)
        self.error = error
        self.detail = detail or error.meaning
        self.headers = headers or {}
        self.status = status or error.status or 500

    @property
    def code(self) -> str:
        return self.error.code

    @property
    def close_code(self) -> int:
        return self.error.close or INTERNAL_ERROR_CLOSE


def error_body(error: ErrorCode, detail: str | None = None, **more: object) -> bytes:
    """The one error body; ``more`` fields after the two (MQTT's answer names the seq)."""
    return orjson.dumps({"error": error.code, "detail": detail or error.meaning, **more})


def markdown_table(errors: Iterable[ErrorCode] | None = None) -> str:
    """The error table of docs/protocol.md."""
    lines = [
        "| code | HTTP | WebSocket close | meaning |",
        "|---|---|---|---|",
    ]
    for error in CATALOGUE.values() if errors is None else errors:
        status = "" if error.status is None else str(error.status)
        close = "" if error.close is None else str(error.close)
        lines.append(f"| `{error.code}` | {status} | {close} | {error.meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(markdown_table())
