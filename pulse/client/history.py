"""Telemetry history as the client returns it (the wire shapes of docs/history.md)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

from pulse.client.events import parse_time

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# How long an export waits for its answer's head, and for each next chunk, before it
# takes the server for gone (a machine or a network lost without a FIN or a RST): then
# it is cut (ExportCut), and a raw export with resume goes on from where it stopped.
# The server writes no keepalive in an export: a chunk comes when PostgreSQL has read
# the next thousand rows, at once for raw readings, but a bucketed export of a long
# range may aggregate for a while before its first row. Nor does a consumer that reads
# slowly count: the wait is only while a read is pending. Five minutes is far above
# both, and still a fraction of the hour (PULSE_EXPORT_MAX_S) a server lets an export
# stream before it cuts it; an export that streams for that hour is never silent that
# long. (Here, not in client.py: `pulse export` shows it in its --help without loading
# httpx.)
EXPORT_READ_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True, slots=True)
class Bucket:
    """One point of a series: a bucket's start (a raw point: the reading's time) and the
    aggregates asked for (the others None)."""

    t: datetime
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    last: float | None = None
    count: int | None = None

    @classmethod
    def from_wire(cls, point: dict[str, Any]) -> Bucket:
        return cls(
            t=parse_time(point["t"]),
            avg=point.get("avg"),
            min=point.get("min"),
            max=point.get("max"),
            last=point.get("last"),
            count=point.get("count"),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class History:
    """Series by metric (one device) or by device (the fleet form).

    ``last_event_id``: the newest event the series include; a stream resumed from
    it continues them with no gap and no duplicate.
    """

    bucket: str
    start: datetime
    end: datetime
    series: dict[str, list[Bucket]]
    last_event_id: int

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> History:
        return cls(
            bucket=str(body["bucket"]),
            start=parse_time(body["from"]),
            end=parse_time(body["to"]),
            series={
                name: [Bucket.from_wire(p) for p in points]
                for name, points in body["series"].items()
            },
            last_event_id=int(body["last_event_id"]),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Reading:
    id: int
    time: datetime
    metrics: dict[str, float | bool]

    @classmethod
    def from_wire(cls, reading: dict[str, Any]) -> Reading:
        return cls(int(reading["id"]), parse_time(reading["time"]), dict(reading["metrics"]))


def history_params(
    start: datetime | str | None,
    end: datetime | str | None,
    bucket: str | None,
    aggregates: list[str] | None,
) -> dict[str, str]:
    params = {}
    if start is not None:
        params["from"] = start if isinstance(start, str) else start.isoformat()
    if end is not None:
        params["to"] = end if isinstance(end, str) else end.isoformat()
    if bucket:
        params["bucket"] = bucket
    if aggregates:
        params["agg"] = ",".join(aggregates)
    return params


def readings_page(
    page: dict[str, Any], params: dict[str, str]
) -> tuple[list[Reading], dict[str, str] | None]:
    """A page of readings, and the parameters that ask for the next (None: the last
    page) from those that asked for this one."""
    readings = [Reading.from_wire(reading) for reading in page["readings"]]
    cursor = page.get("next")
    return readings, after_cursor(params, str(cursor)) if cursor else None


def after_cursor(params: dict[str, str], cursor: str) -> dict[str, str]:
    """The parameters that ask for the raw readings after ``cursor`` (a page's ``next``:
    microseconds since 1970 and an id). Without a ``from``, each request would take the
    server's default, an hour before its now, which moves on between requests: readings
    after the cursor but older than the new default would be left out. The cursor's own
    time is the ``from`` then: every reading after the cursor is at or after it."""
    micros = int(cursor.partition(".")[0])
    time = (_EPOCH + timedelta(microseconds=micros)).isoformat()
    return {"from": time, **params, "cursor": cursor}
