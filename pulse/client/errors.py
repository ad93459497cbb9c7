"""Errors the client raises instead of retrying: retrying could not fix them."""

from __future__ import annotations

# A WebSocket refusal carries only its code (the close's reason; CONTRACT, "Errors"): the
# client gives it the contract's sentence for that code, as an HTTP refusal carries one, so
# both transports say the same. Kept equal to pulse/errors.py by
# tests/client/test_tail_wording.py (the client does not import the server's packages).
CLOSE_SENTENCES = {
    "invalid_parameter": "A query parameter (filter, position, page) is not valid.",
    "tenant_required": "Operators must name a tenant with the tenant_id parameter.",
    "invalid_tenant_id": "tenant_id must be 1 to 64 characters of [A-Za-z0-9_.:-].",
    "bad_request": "The request is malformed.",
    "missing_token": "No token or ticket was sent.",
    "invalid_token": "The token is malformed, forged, or not accepted here.",
    "token_expired": "The token has expired (or did while connected).",
    "invalid_ticket": "The stream ticket is unknown, already used or expired.",
    "unauthorized": "The request needs credentials.",
    "forbidden": "The role or the tenant is not allowed to do this.",
    "origin_not_allowed": "The page's origin is not in PULSE_ALLOWED_ORIGINS (nor, for a "
    "change made with the session cookie, this server's own).",
}


class PulseClientError(Exception):
    """A request Pulse refused for good; ``code`` is the error code or close reason."""

    def __init__(self, status: int, code: str, detail: str = "") -> None:
        super().__init__(f"{status} {code}: {detail}" if detail else f"{status} {code}")
        self.status = status
        self.code = code
        self.detail = detail


class AuthenticationFailed(PulseClientError):
    """The token (even after a refresh, when a refresh callback is set) was refused."""


class Forbidden(PulseClientError):
    """The token is valid but may not read this tenant or stream."""


class BadRequest(PulseClientError):
    """Invalid filters or parameters."""


class NotPulse(PulseClientError):
    """What answered is not a Pulse server (an HTML page, a proxy's answer, another
    service on that address): retrying could not make it one. Check the URL.
    ``status``: the answer's (200 for a page where a stream or an answer was expected,
    404 for another server's "not found"...)."""

    def __init__(self, what: str, status: int = 200) -> None:
        super().__init__(status, "not_pulse", what)


class ExportCut(PulseClientError):
    """An export ended before its end: the server cut it (``PULSE_EXPORT_MAX_S``), the
    connection was lost, or nothing came for ``silent_s`` seconds (the export's read
    timeout). ``received``: how many of its bytes came, all of them already handed
    over; they are not the whole export."""

    def __init__(self, status: int, received: int, *, silent_s: float | None = None) -> None:
        why = (
            "the server cuts an export that streams longer than its PULSE_EXPORT_MAX_S, or "
            "the connection was lost"
            if silent_s is None
            else f"nothing came from the server for {silent_s:g} s (its read timeout)"
        )
        super().__init__(
            status,
            "export_cut",
            f"the export ended after {received:,} bytes, before its end: {why}. What came "
            "is incomplete: a raw export goes on from where it stopped with resume (pulse "
            "export --resume); or ask for a shorter range.",
        )
        self.received = received
        self.silent_s = silent_s
