"""From parsed messages to outcomes: the one path every intake takes.

The HTTP routes and the device fast path (``pulse.web``) parse requests with
``pulse.ingest.intake`` and hand the messages to ``Ingest``, which writes what
authenticates (``TelemetryWriter``) and counts what happened. A second intake
(another protocol) would do the same with its own receipts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime

from pulse.ingest import intake
from pulse.ingest.model import Accepted, Outcome, Submission
from pulse.ingest.writer import TelemetryWriter
from pulse.ops.metrics import Metrics


class Receipt:
    """When the request arrived: the wall clock for readings, a monotonic one for latency."""

    __slots__ = ("_started", "at", "endpoint")

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.at = datetime.now(UTC)
        self._started = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._started


class Ingest:
    def __init__(self, writer: TelemetryWriter, metrics: Metrics) -> None:
        self.writer = writer
        self._metrics = metrics
        self._in_flight: dict[object, float] = {}  # a write's token -> when it came
        metrics.sample(metrics.ingest_in_flight, lambda: len(self._in_flight))
        metrics.sample(metrics.ingest_oldest_in_flight, self._oldest_in_flight_s)

    async def __call__(self, items: Sequence[intake.Item], receipt: Receipt) -> list[Outcome]:
        """One outcome per item, in order: rejected as parsed, or as the writer decided."""
        submissions = [item for item in items if isinstance(item, Submission)]
        token = object()
        self._in_flight[token] = time.monotonic()
        try:
            written = await self.writer.write(submissions)
        finally:
            del self._in_flight[token]
        if len(written) == len(items):  # nothing was refused as parsed: the common case
            outcomes = written
        else:
            answers = iter(written)
            outcomes = [next(answers) if isinstance(i, Submission) else i for i in items]
        self._record(outcomes, receipt)
        return outcomes

    def _oldest_in_flight_s(self) -> float:
        started = self._in_flight.values()
        return time.monotonic() - min(started) if started else 0.0

    def _record(self, outcomes: Sequence[Outcome], receipt: Receipt) -> None:
        metrics = self._metrics
        rows = 0
        accepted = False
        for outcome in outcomes:
            if isinstance(outcome, Accepted):
                accepted = True
                rows += outcome.event_id is not None
            else:
                metrics.ingest_rejected.labels(outcome.reason.code).inc()
        if rows:
            metrics.ingest_rows.labels(receipt.endpoint).inc(rows)
        if accepted:
            metrics.ingest_latency.labels(receipt.endpoint).observe(receipt.elapsed_s())
