"""The one event shape, and the one place that encodes it."""

from __future__ import annotations

from typing import Any

import orjson


class TelemetryEvent:
    """One stored telemetry row, as every stream sends it.

    ``metrics_json`` is the row's jsonb as Postgres printed it: the common,
    unfiltered case embeds it as is, so most events are never decoded at all.
    Encodings are cached on the event, which all subscribers share.
    """

    __slots__ = ("_encoded", "_metrics", "device_id", "id", "metrics_json", "time")

    def __init__(self, id: int, device_id: str, time: str, metrics_json: str) -> None:
        self.id = id
        self.device_id = device_id
        self.time = time
        self.metrics_json = metrics_json
        self._metrics: dict[str, Any] | None = None
        self._encoded: dict[frozenset[str] | None, bytes | None] = {}

    @property
    def metrics(self) -> dict[str, Any]:
        if self._metrics is None:
            self._metrics = orjson.loads(self.metrics_json)
        return self._metrics

    def has_any_metric(self, names: frozenset[str]) -> bool:
        return not names.isdisjoint(self.metrics)

    def encode(self, metrics: frozenset[str] | None = None) -> bytes | None:
        """The event as JSON, keeping only ``metrics`` when given; None when none is left."""
        try:
            return self._encoded[metrics]
        except KeyError:
            pass
        if metrics is None:
            body = self.metrics_json.encode()
        else:
            kept = {k: v for k, v in self.metrics.items() if k in metrics}
            body = orjson.dumps(kept) if kept else b""
        encoded = (
            b'{"type":"telemetry","id":%d,"device_id":%s,"data":{"time":"%s","metrics":%s}}'
            % (self.id, orjson.dumps(self.device_id), self.time.encode(), body)
            if body
            else None
        )
        self._encoded[metrics] = encoded
        return encoded

    def as_dict(self, metrics: frozenset[str] | None = None) -> dict[str, Any] | None:
        encoded = self.encode(metrics)
        return None if encoded is None else orjson.loads(encoded)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"TelemetryEvent(id={self.id}, device_id={self.device_id!r})"


def encoded(events: list[TelemetryEvent], metrics: frozenset[str] | None = None) -> list[bytes]:
    """The events a client with this metric filter gets, each as JSON; the others left out."""
    encodings = [event.encode(metrics) for event in events]
    return [data for data in encodings if data is not None]
