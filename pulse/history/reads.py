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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

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
    # (device_id, metric, bucket start, count, min, max, sum, last, order), ordered.
    rows: Sequence[Any]


@dataclasses.dataclass(frozen=True)
class SeriesJson:
    """A JSON answer's series, built by PostgreSQL: ``json`` is the members of its
    "series" object (``"name":[points],...``), of ``series`` series."""

    bucket: str
    newest_id: int
    series: int
    json: str


@dataclasses.dataclass(frozen=True)
class _Read:
    points: int
    series: int
    found: Any  # rows, or the JSON text of the series


# Reads a statement of series rows (``series`` or ``raw_points``) with its arguments.
_Reader = Callable[[asyncpg.Connection, str, Sequence[Any]], Awaitable[_Read]]


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
    """The buckets (or raw points) of a query as rows: the exports' shape, and what the
    tests compare with a model of the readings."""
    bucket, newest, found = await _series(db, tenant_id, devices, query, kept_since, _rows)
    return Series(bucket, newest, found.found)


async def series_json(
    db: Database,
    tenant_id: str,
    devices: Sequence[str],
    query: HistoryQuery,
    kept_since: Mapping[int, datetime] | None = None,
    *,
    key: Literal["metric", "device_id"],
    max_series: int,
) -> SeriesJson:
    """The same series as JSON text, a series per ``key``, built by PostgreSQL: the
    event loop only splices it into the answer (100,000 points built here point by
    point took 1.6 s of it, and every other request waited; audit H2). Past
    ``max_series`` series the text is not built: the caller refuses the answer."""
    read = _json_reader(key, query.aggregates, max_series)
    bucket, newest, found = await _series(db, tenant_id, devices, query, kept_since, read)
    return SeriesJson(bucket, newest, found.series, found.found)


async def _series(
    db: Database,
    tenant_id: str,
    devices: Sequence[str],
    query: HistoryQuery,
    kept_since: Mapping[int, datetime] | None,
    read: _Reader,
) -> tuple[str, int, _Read]:
    """Buckets of the query's width, or of the width bucket=auto picks: raw points when
    one device has at most MAX_POINTS readings in the range, they are at most
    MAX_ANSWER_POINTS points (a reading has one per metric asked for) and retention
    still keeps them all, else the narrowest width whose rollups are kept
    (``kept_since``) that fits (HistoryQuery.width_for_span). Refused (400) past
    MAX_ANSWER_POINTS: the size checked before the query counts one series per metric
    asked for, and a query that names none gets every metric of its devices (150
    metrics of a minute's buckets over 16 h were 123,750 points; of 69 days, they
    would be millions): ``read`` reads at most one point more than that."""
    async with db.connection() as conn, _snapshot(conn):
        marks = await conn.fetchrow(Q["snapshot_marks"], tenant_id)
        bucket = query.bucket
        series = len(query.metrics) if query.metrics else 1
        raw_args = (tenant_id, devices[0], query.start, query.end, _array(query))
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
                raw = await read(conn, Q["raw_points"], raw_args)
                if raw.points <= MAX_ANSWER_POINTS:
                    return "raw", marks["newest"], raw
                series = max(series, raw.series)
            bucket = query.width_for_span(kept_since, series=series)
        elif bucket == "auto":
            bucket = query.width_for_span(kept_since, series=series)
        if bucket == "raw":
            found = await read(conn, Q["raw_points"], raw_args)
        else:
            await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
            args = _series_args(tenant_id, devices, query, bucket, marks["counted"])
            found = await read(conn, Q["series"], args)
        if found.points > MAX_ANSWER_POINTS:
            raise too_many_points(f"the answer has more than {MAX_ANSWER_POINTS} points")
    return bucket, marks["newest"], found


async def _rows(conn: asyncpg.Connection, statement: str, args: Sequence[Any]) -> _Read:
    rows = await conn.fetch(f"{statement}\nLIMIT ${len(args) + 1}", *args, MAX_ANSWER_POINTS + 1)
    return _Read(len(rows), len({(row[0], row[1]) for row in rows}), rows)


# A point's aggregates as JSON text, from a row of `series` or `raw_points`. A float8
# is shown in its shortest exact form (extra_float_digits = 1, set by the reader). A
# sum past the double's range is +-Infinity (migration 0015): no average then. An
# average below the least double is what IEEE division (Python's) makes of it, 0 or
# +-5e-324, where PostgreSQL's division raises an underflow error (the review: one
# reading of 5e-324 and one of 0 in a minute made every answer holding it a 500).
_AGGREGATE_SQL = {
    "avg": "CASE WHEN NOT (sum > '-Infinity' AND sum < 'Infinity') THEN 'null' "
    "WHEN abs(sum) >= count * '5e-324'::float8 THEN (sum / count)::text "
    "WHEN 2 * abs(sum) > count * '5e-324'::float8 THEN (sign(sum) * '5e-324'::float8)::text "
    "ELSE '0' END",
    "min": "coalesce(min::text, 'null')",
    "max": "coalesce(max::text, 'null')",
    "last": "coalesce(last::text, 'null')",
    "count": "count::text",
}


def _point_sql(aggregates: Sequence[str]) -> str:
    """A point's JSON as SQL: its start and the aggregates asked for, in their order
    (each a name of AGGREGATES: no text from the request is put in the statement)."""
    # A device time of 0001-01-01T00:00:00Z is stored as -infinity (asyncpg's encoding
    # of datetime.min), which to_char makes NULL: the point would vanish.
    time = (
        """coalesce(to_char(t AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'), """
        """'0001-01-01T00:00:00.000Z')"""
    )
    parts = [f"""'{{"t":"' || {time} || '"'"""]
    parts += [f"""',"{name}":' || {_AGGREGATE_SQL[name]}""" for name in aggregates]
    return " || ".join(parts) + " || '}'"


def _json_reader(key: str, aggregates: Sequence[str], max_series: int) -> _Reader:
    template = Q["answer_json"].replace("{key}", key).replace("{point}", _point_sql(aggregates))

    async def read(conn: asyncpg.Connection, statement: str, args: Sequence[Any]) -> _Read:
        await conn.execute("SET LOCAL extra_float_digits = 1")
        n = len(args)
        sql = (
            template.replace("{limit}", f"${n + 1}")
            .replace("{max_series}", f"${n + 2}")
            .replace("{rows}", statement)
        )
        row = await conn.fetchrow(sql, *args, MAX_ANSWER_POINTS + 1, max_series)
        return _Read(row["points"], row["series"], row["json"])

    return read


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
