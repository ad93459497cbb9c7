"""A series answers what its readings say, whatever the rollups have counted: random
readings (late, out of order, across midnight, booleans), rollup passes at random points
and in small steps, every width, held against the same buckets computed from the rows."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from pulse.db.database import Database
from pulse.history import reads, rollups
from pulse.history.params import AGGREGATES, WIDTHS, HistoryQuery
from pulse.history.rollups import roll_up_once
from tests.history.readings import readings_at

T0 = datetime(2026, 12, 1, 22, 30, tzinfo=UTC)  # the range crosses midnight
DEVICES = ("d1", "d2", "d3")
Reading = tuple[int, str, datetime, dict[str, Any]]  # id, device, device time, metrics


def random_metrics(rng: random.Random) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "temp": round(rng.uniform(-20, 40), 2),
        "count": rng.randrange(-5, 1000),
        "door": rng.random() < 0.5,
    }
    kept = rng.sample(sorted(metrics), rng.randint(1, 3))
    return {name: metrics[name] for name in kept}


def _aggregate(points: list[tuple[datetime, int, float]]) -> tuple[int, float, float, float, float]:
    values = [value for _, _, value in points]
    return len(values), min(values), max(values), sum(values), max(points)[2]


def model(
    readings: Sequence[Reading],
    devices: Sequence[str],
    metrics: Sequence[str] | None,
    first: datetime,
    after_last: datetime,
    width: timedelta,
) -> dict[tuple[str, str, datetime], tuple[int, float, float, float, float]]:
    """Each bucket's count, min, max, sum and last, from the readings themselves."""
    buckets: dict[tuple[str, str, datetime], list[tuple[datetime, int, float]]] = {}
    for event_id, device, moment, values in readings:
        if device not in devices or not first <= moment < after_last:
            continue
        start = reads.align(moment, width)
        for name, value in values.items():
            if metrics is None or name in metrics:
                buckets.setdefault((device, name, start), []).append(
                    (moment, event_id, float(value))
                )
    return {key: _aggregate(points) for key, points in buckets.items()}


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_series_match_the_readings_at_every_width_and_lag(
    pool: asyncpg.Pool, db: Database, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    rng = random.Random(seed)
    monkeypatch.setattr(rollups, "BATCH_IDS", rng.choice([5, 13, 1000]))
    committed: list[Reading] = []
    checked = 0
    for _ in range(10):
        batch = [
            (
                rng.choice(DEVICES),
                T0 + timedelta(seconds=rng.randrange(-1800, 4 * 3600)),
                random_metrics(rng),
            )
            for _ in range(rng.randint(1, 40))
        ]
        ids = await readings_at(pool, "t1", batch)
        committed += [(i, d, t, m) for i, (d, t, m) in zip(ids, batch, strict=True)]
        if rng.random() < 0.5:
            async with pool.acquire() as conn:
                await roll_up_once(conn)
        for bucket, width in WIDTHS.items():
            devices = sorted(rng.sample(DEVICES, rng.randint(1, 3)))
            metrics = (
                None if rng.random() < 0.5 else tuple(rng.sample(["temp", "count", "door"], 2))
            )
            start = T0 + timedelta(seconds=rng.randrange(-2400, 3600))
            end = start + timedelta(seconds=rng.randrange(60, 6 * 3600))
            query = HistoryQuery(start, end, bucket, AGGREGATES, metrics, 1000, None)
            got = await reads.series(db, "t1", devices, query)
            first = reads.align(start, width)
            after_last = reads.align(end - timedelta(microseconds=1), width) + width
            want = model(committed, devices, metrics, first, after_last, width)
            assert got.bucket == bucket and got.newest_id == committed[-1][0]
            answered = {(r[0], r[1], r[2]): tuple(r[3:8]) for r in got.rows}
            assert sorted(answered) == sorted(want), (bucket, seed)
            for key, (count, low, high, total, last) in want.items():
                got_count, got_low, got_high, got_total, got_last = answered[key]
                assert (got_count, got_low, got_high, got_last) == (count, low, high, last), key
                assert math.isclose(got_total, total, rel_tol=1e-9, abs_tol=1e-9), key
            # The rows come in (device, metric, time) order.
            assert [(r[0], r[1], r[2]) for r in got.rows] == sorted(answered)
            checked += len(want)
    assert checked > 100


@pytest.mark.parametrize("bucket", ["raw", "1m", "1h"])
async def test_a_json_answer_shows_each_row_as_its_point(
    pool: asyncpg.Pool, db: Database, bucket: str
) -> None:
    """JSON answers are built by PostgreSQL (audit H2: built point by point on the event
    loop, 100,000 points held it for 1.6 s): each point is what ``point`` makes of its
    row, in the rows' order, every float exact, an average past the double's range
    null, the aggregates in the order asked for."""
    rng = random.Random(7)
    values = [1.5e308, -1.5e308, 0.1, 1e-300, -0.0, 123456789.123456789, 1e16, True, 3, 2.5]
    batch = [
        (
            rng.choice(DEVICES),
            T0 + timedelta(seconds=rng.randrange(0, 3 * 3600), microseconds=rng.randrange(10**6)),
            {
                "temp": rng.choice(values),
                "huge": 1.5e308,
                "n": rng.randrange(-5, 5),
                # Averages below the least double: 0 or +-5e-324, never an error.
                "tiny": rng.choice([5e-324, 0.0, -5e-324, 1e-323]),
            },
        )
        for _ in range(120)
    ]
    await readings_at(pool, "t1", batch[:60])
    async with pool.acquire() as conn:
        await roll_up_once(conn)
    await readings_at(pool, "t1", batch[60:])  # some counted, some not yet
    aggregates = ("count", "last", "avg", "min", "max")
    query = HistoryQuery(T0, T0 + timedelta(hours=3), bucket, aggregates, None, 1000, None)

    def shown_by(rows: Sequence[Any], key: int) -> dict[str, list[dict[str, Any]]]:
        want: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            want.setdefault(row[key], []).append(reads.point(row, aggregates))
        return want

    nulls = 0
    for device in DEVICES:
        rows = (await reads.series(db, "t1", [device], query)).rows
        got = await reads.series_json(db, "t1", [device], query, key="metric", max_series=100)
        shown = json.loads("{" + got.json + "}")
        assert shown == shown_by(rows, 1) and got.series == len(shown) == 4
        assert list(shown) == sorted(shown)
        assert {tuple(p) for s in shown.values() for p in s} == {("t", *aggregates)}
        nulls += sum(p["avg"] is None for p in shown["huge"])
    assert nulls > 0 or bucket == "raw"
    if bucket != "raw":  # the fleet form: a series per device
        query = dataclasses.replace(query, metrics=("temp",))
        rows = (await reads.series(db, "t1", list(DEVICES), query)).rows
        got = await reads.series_json(db, "t1", list(DEVICES), query, key="device_id", max_series=3)
        assert json.loads("{" + got.json + "}") == shown_by(rows, 0)


async def test_a_reading_at_the_first_instant_of_year_one_keeps_its_point(
    pool: asyncpg.Pool, db: Database
) -> None:
    """Ingest takes 0001-01-01T00:00:00Z, which asyncpg stores as -infinity; the JSON
    built by PostgreSQL dropped its point (the review)."""
    first = datetime(1, 1, 1, tzinfo=UTC)
    await readings_at(
        pool, "t1", [("d1", first, {"v": 1.0}), ("d1", first + timedelta(seconds=1), {"v": 2.0})]
    )
    query = HistoryQuery(first, first + timedelta(hours=1), "raw", ("last",), None, 1000, None)
    got = await reads.series_json(db, "t1", ["d1"], query, key="metric", max_series=100)
    assert json.loads("{" + got.json + "}") == {
        "v": [
            {"t": "0001-01-01T00:00:00.000Z", "last": 1.0},
            {"t": "0001-01-01T00:00:01.000Z", "last": 2.0},
        ]
    }
