"""The history API's parameters, parsed and checked without I/O.

Every bad value is an ``ApiError(INVALID_PARAMETER)`` that says which parameter
and why.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from pulse.errors import INVALID_PARAMETER, ApiError
from pulse.names import is_valid_name, unknown_parameter
from pulse.times import MAX_CLOCK_AHEAD

WIDTHS: dict[str, timedelta] = {
    "1m": timedelta(minutes=1),
    "5m": timedelta(minutes=5),
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "1d": timedelta(days=1),
}
# The stored rollups (pulse.history.rollups, their width in minutes) each bucket is
# made from.
STORED_WIDTH = {"1m": 1, "5m": 1, "15m": 15, "1h": 60, "1d": 60}
BUCKETS = ("auto", "raw", *WIDTHS)
AGGREGATES = ("avg", "min", "max", "last", "count")
# bucket=auto: at most about this many points in a series.
MAX_POINTS = 1000
# A JSON answer's most buckets, over all its series: one of 2,000 devices' 7 days at
# 15 minutes (1.3 million, 130 MB) held its process's event loop for seconds. Beyond
# it, a wider bucket (auto picks one), fewer series, or a streamed export.
MAX_ANSWER_POINTS = 100_000
# In ``kept_since``: the oldest receipt time raw readings are kept from (retention).
RAW = 0
DEFAULT_SPAN = timedelta(hours=1)
# Ingest accepts device times up to MAX_CLOCK_AHEAD (5 minutes) ahead of its clock
# when a reading arrives (pulse.ingest.validation): without ``to``, a range ends twice
# that far ahead (room for readings still in flight), so that it holds every reading
# committed so far. A dashboard resuming its stream from the history's newest id
# relies on it: nothing committed before is left out.
CLOCK_AHEAD = 2 * MAX_CLOCK_AHEAD
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
# bucket=raw: a page ends where its readings pass this many bytes of JSON, whatever the
# limit (10,000 readings of 200 metrics were 16.5 MB, held until the client took it).
MAX_PAGE_BYTES = 1024 * 1024
MAX_METRICS = 100
# A device's JSON answer's most series (one per metric): as many as `metrics` may name,
# so that any answer can be asked for again metric by metric. Without it a device that
# sent 100,000 metric names once each answered 100,000 series of one point, 9.7 MB
# (audit H2); past it, name the metrics, or export.
MAX_ANSWER_SERIES = MAX_METRICS
MAX_DEVICES = 1000
# What each history URL takes (tenant_id: an operator's tenant).
DEVICE_PARAMETERS = ("from", "to", "bucket", "agg", "metrics", "limit", "cursor", "tenant_id")
FLEET_PARAMETERS = ("metric", "device_id", "from", "to", "bucket", "agg", "tenant_id")


@dataclasses.dataclass(frozen=True)
class Cursor:
    """Where a page of raw readings ended: readings come in (device time, id) order."""

    time: datetime
    id: int

    def encode(self) -> str:
        micros = (self.time - _EPOCH) // timedelta(microseconds=1)
        return f"{micros}.{self.id}"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FIRST = datetime.min.replace(tzinfo=UTC) + timedelta(days=1)
_LAST = datetime.max.replace(tzinfo=UTC) - timedelta(days=1)


@dataclasses.dataclass(frozen=True)
class HistoryQuery:
    start: datetime
    end: datetime
    bucket: str  # one of BUCKETS
    aggregates: tuple[str, ...]
    metrics: tuple[str, ...] | None  # None: every metric
    limit: int
    cursor: Cursor | None
    devices: tuple[str, ...] | None = None  # the fleet form's device filter

    def width_for_span(
        self, kept_since: Mapping[int, datetime] | None = None, series: int = 1
    ) -> str:
        """The narrowest bucket that keeps a series within MAX_POINTS, ``series`` of them
        within MAX_ANSWER_POINTS, and, with ``kept_since`` (per stored width, the oldest
        time its rollups are kept from), whose rollups still hold the range's start."""
        span = self.end - self.start
        for name, width in WIDTHS.items():
            kept = kept_since is None or self.start >= kept_since[STORED_WIDTH[name]]
            fits = span / width <= MAX_POINTS and self.buckets(name) * series <= MAX_ANSWER_POINTS
            if fits and kept:
                return name
        return "1d"

    def raw_kept(self, kept_since: Mapping[int, datetime] | None) -> bool:
        """Whether retention still keeps every raw reading of the range: before its
        horizon, raw points would be a part of them (bucket=auto then takes rollups).
        Retention drops readings by when they arrived, and a reading's device time may
        be MAX_CLOCK_AHEAD ahead of that: only a range that starts that much after the
        horizon surely has none of its readings dropped."""
        if kept_since is None or RAW not in kept_since:
            return True
        return self.start >= kept_since[RAW] + MAX_CLOCK_AHEAD

    def buckets(self, name: str) -> int:
        """How many buckets of width ``name`` the range touches."""
        return int((self.end - self.start) / WIDTHS[name]) + 2

    def check_size(self, bucket: str, series: int) -> None:
        """Refuse a JSON answer of more than MAX_ANSWER_POINTS buckets."""
        points = self.buckets(bucket) * series
        if points > MAX_ANSWER_POINTS:
            raise too_many_points(
                f"{series} series of up to {self.buckets(bucket)} buckets of {bucket} would "
                f"be more than {MAX_ANSWER_POINTS} points"
            )


def too_many_points(what: str) -> ApiError:
    return _bad(
        f"{what}: ask for a wider bucket, fewer devices or metrics, a shorter range, or an "
        "export (Accept: text/csv or application/x-ndjson)."
    )


def too_many_series() -> ApiError:
    return _bad(
        f"the device has more than {MAX_ANSWER_SERIES} metrics in the range, a series "
        f"each: name at most {MAX_METRICS} in metrics (a request per set of them), or ask "
        "for an export (Accept: text/csv or application/x-ndjson)."
    )


def parse_history(args: Mapping[str, str], *, now: datetime, fleet: bool = False) -> HistoryQuery:
    stray = unknown_parameter(args, FLEET_PARAMETERS if fleet else DEVICE_PARAMETERS)
    if stray is not None:
        raise _bad(stray)
    given_end = _time(args, "to")
    end = given_end or now + CLOCK_AHEAD
    # An hour before the range's end when it is given, else an hour ago.
    start = _time(args, "from") or (given_end or now) - DEFAULT_SPAN
    if start >= end:
        raise _bad("from must be before to.")
    bucket = args.get("bucket") or "auto"
    if bucket not in BUCKETS:
        raise _bad(f"bucket must be one of {', '.join(BUCKETS)}.")
    if fleet and bucket == "raw":
        raise _bad("bucket=raw reads one device: use /devices/{device_id}/telemetry.")
    aggregates = _names(args.get("agg"), "agg", names=False) or AGGREGATES
    unknown = [a for a in aggregates if a not in AGGREGATES]
    if unknown:
        raise _bad(f"agg {unknown[0]!r} is not one of {', '.join(AGGREGATES)}.")
    if fleet:
        metric = args.get("metric")
        if not metric or not is_valid_name(metric):
            raise _bad("metric is required: one metric name, 1 to 64 of [A-Za-z0-9_.:-].")
        metrics: tuple[str, ...] | None = (metric,)
        devices = _names(args.get("device_id"), "device_id", limit=MAX_DEVICES)
    else:
        metrics = _names(args.get("metrics"), "metrics", limit=MAX_METRICS)
        devices = None
    return HistoryQuery(
        start=start,
        end=end,
        bucket=bucket,
        aggregates=tuple(dict.fromkeys(aggregates)),
        metrics=metrics,
        limit=_limit(args.get("limit")),
        cursor=_cursor(args.get("cursor")),
        devices=devices,
    )


def _time(args: Mapping[str, str], name: str) -> datetime | None:
    raw = args.get(name)
    if not raw:
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("z", "Z"))
    except ValueError:
        hint = " (a + in a URL's query is a space: send it as %2B)" if " " in raw else ""
        raise _bad(
            f"{name} must be an ISO 8601 time, such as 2026-11-27T17:00:00Z{hint}."
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # the contract's times are UTC
    # Within a day of the calendar's ends: room to align to a bucket and add a margin.
    try:
        if _FIRST <= moment <= _LAST:
            return moment.astimezone(UTC)
    except OverflowError:
        pass
    raise _bad(f"{name} must be from {_FIRST.date()} to {_LAST.date()} (UTC).")


def _names(
    raw: str | None, name: str, *, limit: int | None = None, names: bool = True
) -> tuple[str, ...] | None:
    """Comma-separated values, each once, in order; ``names``: each a valid name."""
    if raw is None or raw == "":
        return None
    values = tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))
    if names:
        bad = [n for n in values if not is_valid_name(n)]
        if bad:
            raise _bad(f"{name}: {bad[0][:64]!r} is not 1 to 64 of [A-Za-z0-9_.:-].")
    if limit is not None and len(values) > limit:
        raise _bad(f"{name}: at most {limit} names.")
    return values or None


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_LIMIT:
        raise _bad(f"limit must be an integer from 1 to {MAX_LIMIT}.")
    return int(raw)


def _cursor(raw: str | None) -> Cursor | None:
    if raw is None or raw == "":
        return None
    # ASCII digits only (int() also reads other scripts' digits, "_" and spaces), and an
    # id that is a bigint: anything else is no `next` this server gave.
    found = _CURSOR.fullmatch(raw)
    try:
        if found is None or int(found[2]) > _MAX_ID:
            raise ValueError(raw)
        return Cursor(_EPOCH + timedelta(microseconds=int(found[1])), int(found[2]))
    except (ValueError, OverflowError):
        raise _bad("cursor must be the next value of the previous page.") from None


_CURSOR = re.compile(r"(-?[0-9]{1,19})\.([0-9]{1,19})", re.ASCII)
_MAX_ID = 2**63 - 1


def _bad(detail: str) -> ApiError:
    return ApiError(INVALID_PARAMETER, detail)
