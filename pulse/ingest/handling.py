"""From parsed messages to outcomes and replies: what every ingest door shares.

The Quart routes (``pulse.ingest.routes``) and the device fast path
(``pulse.ingest.fastpath``) both write through ``ingest`` and answer a single
message with ``reply``, so a reading gets the same answer whichever door it
came in by.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

import orjson
from quart import Quart

from pulse.app import Runtime
from pulse.errors import error_body, error_for
from pulse.ingest import intake
from pulse.ingest.model import (
    INVALID_DEVICE_TOKEN,
    INVALID_PAYLOAD,
    PAYLOAD_TOO_LARGE,
    RATE_LIMITED,
    UNKNOWN_DEVICE,
    Accepted,
    Outcome,
    Rejected,
    Submission,
)
from pulse.ingest.ratelimit import Admission, RateLimiter
from pulse.ingest.writer import TelemetryWriter

STATUS = {
    INVALID_PAYLOAD: 400,
    INVALID_DEVICE_TOKEN: 401,
    UNKNOWN_DEVICE: 404,
    PAYLOAD_TOO_LARGE: 413,
    RATE_LIMITED: 429,
}

_WRITER = "pulse.ingest.writer"


def ingest_writer(app: Quart) -> TelemetryWriter:
    """The app's writer, built on first use: the pool exists only once the app is serving."""
    writer = app.extensions.get(_WRITER)
    if writer is None:
        rt = cast(Runtime, app.extensions["pulse"])
        settings = rt.settings
        admit = Admission(
            per_device=RateLimiter(
                settings.ingest_rate_per_device, settings.ingest_burst_per_device
            ),
            per_tenant=RateLimiter(
                settings.ingest_rate_per_tenant, settings.ingest_burst_per_tenant
            ),
        )
        writer = app.extensions[_WRITER] = TelemetryWriter(
            rt.pool, admit=admit, group_commit=settings.group_commit
        )
    return cast(TelemetryWriter, writer)


class Receipt:
    """When the request arrived: the wall clock for readings, a monotonic one for latency."""

    __slots__ = ("_started", "at", "endpoint")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.at = datetime.now(UTC)
        self._started = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._started


async def ingest(app: Quart, items: Sequence[intake.Item], receipt: Receipt) -> list[Outcome]:
    """The one path from parsed messages to outcomes, for every endpoint."""
    decided: dict[int, Outcome] = {
        i: item for i, item in enumerate(items) if isinstance(item, Rejected)
    }
    pending = [(i, item) for i, item in enumerate(items) if isinstance(item, Submission)]
    if pending:
        written = await ingest_writer(app).write([submission for _, submission in pending])
        decided.update(zip([i for i, _ in pending], written, strict=True))
    outcomes = [decided[i] for i in range(len(items))]
    _record(cast(Runtime, app.extensions["pulse"]), outcomes, receipt)
    return outcomes


def _record(rt: Runtime, outcomes: Sequence[Outcome], receipt: Receipt) -> None:
    metrics = rt.metrics
    rows = sum(isinstance(o, Accepted) and o.event_id is not None for o in outcomes)
    for outcome in outcomes:
        if isinstance(outcome, Rejected):
            metrics.ingest_rejected.labels(outcome.reason).inc()
    if rows:
        metrics.ingest_rows.labels(receipt.endpoint).inc(rows)
    if any(isinstance(o, Accepted) for o in outcomes):
        metrics.ingest_latency.labels(receipt.endpoint).observe(receipt.elapsed_s())


@dataclasses.dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer: status, JSON body (None: no body) and extra headers."""

    status: int
    body: bytes | None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


def reply(outcome: Outcome) -> Reply:
    """The answer to one message: 201 with its id, 204 for a heartbeat, or the error."""
    if isinstance(outcome, Rejected):
        headers: dict[str, str] = {}
        if outcome.reason == RATE_LIMITED:
            headers["Retry-After"] = str(max(1, math.ceil(outcome.retry_after_s)))
        return Reply(STATUS[outcome.reason], error_body(outcome.reason, outcome.detail), headers)
    if outcome.event_id is None:
        return Reply(204, None)
    return Reply(201, orjson.dumps({"id": outcome.event_id}))


def error_reply(exc: Exception) -> Reply:
    """The answer to a request that raised ``exc``, as Quart's error handlers give it."""
    error = error_for(exc)
    return Reply(error.status, error_body(error.code, error.detail), error.headers)
