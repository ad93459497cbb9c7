"""What the history API reads: series of buckets, raw points, pages of readings, exports.

A series comes from the rollups, merged with the rows they have not counted yet,
in one snapshot whose newest committed id is returned with it: a dashboard that
resumes its live stream from that id sees each reading once, in the history or
in the stream. Exports read through a server-side cursor, a batch at a time, so
their size is not bounded by memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from pulse.db.database import Database
from pulse.db.queries import load_queries
from pulse.history.params import (
    MAX_ANSWER_POINTS,
    MAX_PAGE_BYTES,
    MAX_POINTS,
    STORED_WIDTH,
    WIDTHS,
    Cursor,
    HistoryQuery,
    too_many_points,
)
from pulse.names import is_valid_name
from pulse.times import format_time

Q = load_queries(__package__)

_READINGS_PAGE = Q["readings_page"].replace("{readings}", Q["readings"])

_ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
_TICK = timedelta(microseconds=1)
EXPORT_BATCH = 1000


@dataclasses.dataclass(frozen=True)
class Series:
    bucket: str
    newest_id: int
    # (device_id, metric, bucket start, count, min, max, sum, last), ordered.
    rows: Sequence[Any]


def align(moment: datetime, width: timedelta) -> datetime:
    """The start of the bucket of ``width`` that holds ``moment`` (UTC midnight aligned)."""
    return _ORIGIN + (moment - _ORIGIN) // width * width


async def device_exists(db: Database, tenant_id: str, device_id: str) -> bool:
    # A name no device can have (a NUL, which PostgreSQL refuses in text) is no device.
    if not is_valid_name(device_id):
        return False
    return bool(await db.fetchval(Q["device_exists"], tenant_id, device_id))


async def tenant_devices(db: Database, tenant_id: str) -> list[str]:
    return [r["device_id"] for r in await db.fetch(Q["tenant_devices"], tenant_id)]


async def series(
    db: Database,
    tenant_id: str,
    devices: Sequence[str],
    query: HistoryQuery,
    kept_since: Mapping[int, datetime] | None = None,
) -> Series:
    """Buckets of the query's width, or of the width bucket=auto picks: raw points when
    one device has at most MAX_POINTS readings in the range, they are at most
    MAX_ANSWER_POINTS points (a reading has one per metric asked for) and retention
    still keeps them all, else the narrowest width whose rollups are kept
    (``kept_since``) that fits (HistoryQuery.width_for_span)."""
    async with db.connection() as conn, _snapshot(conn):
        marks = await conn.fetchrow(Q["snapshot_marks"], tenant_id)
        bucket = query.bucket
        series = len(query.metrics) if query.metrics else 1
        if bucket == "auto" and len(devices) == 1 and query.raw_kept(kept_since):
            count = await conn.fetchval(
                Q["count_readings"], tenant_id, devices[0], query.start, query.end, MAX_POINTS + 1
            )
            if count <= MAX_POINTS:
                # Read as raw points, which they are unless they pass MAX_ANSWER_POINTS
                # (1000 readings of 150 metrics are 150,000: raw was picked by the
                # readings alone, then refused, where minutes fitted); then a width
                # for as many series as the metrics read. Counting their points first
                # read every reading's row for every chart (0.5 ms -> 42-72 ms).
                raw, metrics = await _raw_points(conn, tenant_id, devices[0], query)
                if raw is not None:
                    return Series("raw", marks["newest"], raw)
                series = max(series, metrics)
            bucket = query.width_for_span(kept_since, series=series)
        elif bucket == "auto":
            bucket = query.width_for_span(kept_since)
        if bucket == "raw":
            raw, _ = await _raw_points(conn, tenant_id, devices[0], query)
            if raw is None:
                raise too_many_points(f"the answer has more than {MAX_ANSWER_POINTS} points")
            rows: Sequence[Any] = raw
        else:
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            args = _series_args(tenant_id, devices, query, bucket, marks["counted"])
            rows = await _at_most_answer_points(
                conn.cursor(Q["series"], *args, prefetch=EXPORT_BATCH)
            )
    return Series(bucket, marks["newest"], rows)


async def _raw_points(
    conn: asyncpg.Connection, tenant_id: str, device_id: str, query: HistoryQuery
) -> tuple[list[Any] | None, int]:
    """A device's readings of the range as series rows (one per metric of a reading),
    or None past MAX_ANSWER_POINTS; and how many metrics the rows read were of."""
    cursor = conn.cursor(
        Q["raw_points"],
        tenant_id,
        device_id,
        query.start,
        query.end,
        _array(query),
        prefetch=EXPORT_BATCH,
    )
    rows: list[Any] = []
    metrics: set[str] = set()
    async for p in cursor:
        metrics.add(p["metric"])
        if len(rows) == MAX_ANSWER_POINTS:
            return None, len(metrics)
        rows.append(
            (device_id, p["metric"], p["t"], 1, p["value"], p["value"], p["value"], p["value"])
        )
    return rows, len(metrics)


async def _at_most_answer_points(cursor: Any) -> list[Any]:
    """The cursor's rows, refused (400) past MAX_ANSWER_POINTS: the size checked before
    the query counts one series per metric asked for, and a query that names none gets
    every metric of its devices (150 metrics of a minute's buckets over 16 h were
    123,750 points; of 69 days, they would be millions)."""
    rows = []
    async for row in cursor:
        rows.append(row)
        if len(rows) > MAX_ANSWER_POINTS:
            raise too_many_points(f"the answer has more than {MAX_ANSWER_POINTS} points")
    return rows


async def readings_page(
    db: Database, tenant_id: str, device_id: str, query: HistoryQuery
) -> tuple[list[Any], str | None]:
    """One page of raw readings and the cursor of the next (None: the last page): at
    most ``query.limit`` readings, and no more once they pass MAX_PAGE_BYTES."""
    args = _readings_args(tenant_id, device_id, query, query.limit + 1)
    found = await db.fetch(_READINGS_PAGE, *args, MAX_PAGE_BYTES)
    # With one more than the page: the next page's first reading.
    rows = [row for row in found[: query.limit] if row["before"] < MAX_PAGE_BYTES]
    if len(rows) == len(found):
        return rows, None
    last = rows[-1]
    return rows, Cursor(last["device_time"], last["id"]).encode()


async def export_readings(
    db: Database, tenant_id: str, device_id: str, query: HistoryQuery
) -> AsyncIterator[list[Any]]:
    """Every raw reading of the range (after the cursor), batch by batch."""
    args = _readings_args(tenant_id, device_id, query, None)
    async with db.connection() as conn, _snapshot(conn):
        async for batch in _batches(conn.cursor(Q["readings"], *args, prefetch=EXPORT_BATCH)):
            yield batch


async def export_series(
    db: Database, tenant_id: str, devices: Sequence[str], query: HistoryQuery, bucket: str
) -> AsyncIterator[list[Any]]:
    async with db.connection() as conn, _snapshot(conn):
        counted = (await conn.fetchrow(Q["snapshot_marks"], tenant_id))["counted"]
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        args = _series_args(tenant_id, devices, query, bucket, counted)
        async for batch in _batches(conn.cursor(Q["series"], *args, prefetch=EXPORT_BATCH)):
            yield batch


def point(row: Sequence[Any], aggregates: Sequence[str]) -> dict[str, Any]:
    """One bucket as the API shows it: its start and the aggregates asked for."""
    _, _, start, count, low, high, total, last = row[:8]
    # A sum past the double's range is +-Infinity (migration 0015): no average then.
    average = total / count if math.isfinite(total) else None
    values = {"avg": average, "min": low, "max": high, "last": last, "count": count}
    return {"t": format_time(start), **{name: values[name] for name in aggregates}}


def _series_args(
    tenant_id: str, devices: Sequence[str], query: HistoryQuery, bucket: str, counted: int
) -> tuple[Any, ...]:
    width = WIDTHS[bucket]
    return (
        tenant_id,
        list(devices),
        _array(query),
        align(query.start, width),
        # The end of the bucket that holds the range's end: a bucket that starts before
        # `to` is whole, and the same whether its readings are rolled up yet or not.
        align(query.end - _TICK, width) + width,
        width,
        STORED_WIDTH[bucket],
        counted,
    )


def _readings_args(
    tenant_id: str, device_id: str, query: HistoryQuery, limit: int | None
) -> tuple[Any, ...]:
    cursor = query.cursor
    return (
        tenant_id,
        device_id,
        query.start,
        query.end,
        cursor.time if cursor else None,
        cursor.id if cursor else None,
        _array(query),
        limit,
    )


def _array(query: HistoryQuery) -> list[str] | None:
    return list(query.metrics) if query.metrics else None


@contextlib.asynccontextmanager
async def _snapshot(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Every statement of the block reads the same committed state, for as long as the
    client takes to read it (an export waits on its client inside the transaction)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        await conn.execute("SET LOCAL idle_in_transaction_session_timeout = 0")
        yield


async def _batches(cursor: Any) -> AsyncIterator[list[Any]]:
    batch: list[Any] = []
    async for row in cursor:
        batch.append(row)
        if len(batch) >= EXPORT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch
