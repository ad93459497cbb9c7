"""Errors the client raises instead of retrying: retrying could not fix them."""

from __future__ import annotations


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
    service on that address): retrying could not make it one. Check the URL."""

    def __init__(self, what: str) -> None:
        super().__init__(200, "not_pulse", what)


class ExportCut(PulseClientError):
    """An export ended before its end: the server cut it (``PULSE_EXPORT_MAX_S``), or
    the connection was lost. ``received``: how many of its bytes came, all of them
    already handed over; they are not the whole export."""

    def __init__(self, status: int, received: int) -> None:
        super().__init__(
            status,
            "export_cut",
            f"the export ended after {received:,} bytes, before its end: the server cuts "
            "an export that streams longer than its PULSE_EXPORT_MAX_S, or the "
            "connection was lost. What came is incomplete: a raw export goes on from "
            "where it stopped with resume (pulse export --resume); or ask for a shorter "
            "range.",
        )
        self.received = received
