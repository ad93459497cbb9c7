"""Shapes for /openapi.json only. Requests are checked by validation.py, not by these."""

from __future__ import annotations

import dataclasses
from datetime import datetime
from typing import Literal


@dataclasses.dataclass
class ReadingBody:
    """One reading. ts defaults to the server's receive time; at most 200 metrics."""

    metrics: dict[str, float | bool]
    ts: datetime | None = None
    seq: int | None = None


@dataclasses.dataclass
class ProvisionTokenHeader:
    x_provision_token: str


@dataclasses.dataclass
class BatchMessage:
    tenant_id: str
    device_id: str
    provision_token: str
    metrics: dict[str, float | bool]
    ts: datetime | None = None
    seq: int | None = None


@dataclasses.dataclass
class BatchBody:
    """1 to 1000 messages, each judged on its own."""

    messages: list[BatchMessage]


@dataclasses.dataclass
class EventId:
    """Stored and committed."""

    id: int


@dataclasses.dataclass
class BatchResult:
    index: int
    status: Literal["accepted", "rejected"]
    id: int | None = None
    reason: str | None = None


@dataclasses.dataclass
class BatchResponse:
    """One result per message, in order (400 when none was accepted)."""

    accepted: int
    rejected: int
    results: list[BatchResult]


@dataclasses.dataclass
class Error:
    """The error body: a machine code and a sentence."""

    error: str
    detail: str


@dataclasses.dataclass
class RetryAfterHeader:
    retry_after: int


@dataclasses.dataclass
class NoContent:
    """Seen; nothing is stored and the body is empty."""


DEVICE_ERRORS: dict[int, tuple[type, type | None]] = {
    400: (Error, None),
    401: (Error, None),
    404: (Error, None),
    413: (Error, None),
    429: (Error, RetryAfterHeader),
}
