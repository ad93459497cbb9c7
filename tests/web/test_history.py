"""The history API on a real server: buckets, raw pages, exports, the fleet form, errors."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, time, timedelta

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from pulse.db.retention import create_partitions, drop_expired
from pulse.history.rollups import RollupSettings, roll_up_once, trim
from tests.history.readings import readings_at
from tests.support import provision_device, running_server, seam

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
S = timedelta(seconds=1)
DEVICE = "/api/v1/customer/devices/{}/telemetry"
FLEET = "/api/v1/customer/telemetry/history"


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture
async def http(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> AsyncIterator[httpx.AsyncClient]:
    for device in ("d1", "d2"):
        await provision_device(pool, "t1", device)
    await provision_device(pool, "t2", "other")
    # The server's own rollup task may run or not: the answers must be the same.
    async with (
        running_server(dataclasses.replace(settings, rollup_interval_s=3600)) as url,
        httpx.AsyncClient(
            base_url=url, timeout=20, headers={"Authorization": f"Bearer {make_token('t1')}"}
        ) as client,
    ):
        yield client


def window(**params: object) -> dict[str, str]:
    base = {"from": iso(T0), "to": iso(T0 + timedelta(minutes=10))}
    return {**base, **{k: str(v) for k, v in params.items()}}


async def test_buckets_merge_rollups_with_rows_not_counted_yet(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await readings_at(pool, "t1", [("d1", T0 + i * 10 * S, {"temp": float(i)}) for i in range(9)])
    async with pool.acquire() as conn:
        await roll_up_once(conn)
    # Counted in the rollups: ids 1-9; not yet: 10-12 (one of them in a counted minute).
    newest = await readings_at(
        pool,
        "t1",
        [
            ("d1", T0 + 55 * S, {"temp": 100.0, "hum": 1.0}),
            ("d1", T0 + 130 * S, {"temp": -1.0}),
            ("d2", T0 + 5 * S, {"temp": 7.0}),
        ],
    )
    r = await http.get(DEVICE.format("d1"), params=window(bucket="1m"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bucket"] == "1m" and body["device_id"] == "d1"
    assert body["last_event_id"] == newest[-1]
    assert body["from"] == "2026-12-01T10:00:00.000Z"
    assert body["series"] == {
        "hum": [{"t": "2026-12-01T10:00:00.000Z", "avg": 1.0, "min": 1.0, "max": 1.0,
                 "last": 1.0, "count": 1}],
        "temp": [
            {"t": "2026-12-01T10:00:00.000Z", "avg": 115 / 7, "min": 0.0, "max": 100.0,
             "last": 100.0, "count": 7},
            {"t": "2026-12-01T10:01:00.000Z", "avg": 7.0, "min": 6.0, "max": 8.0,
             "last": 8.0, "count": 3},
            {"t": "2026-12-01T10:02:00.000Z", "avg": -1.0, "min": -1.0, "max": -1.0,
             "last": -1.0, "count": 1},
        ],
    }  # fmt: skip
    hourly = await http.get(
        DEVICE.format("d1"), params=window(bucket="1h", agg="count,max", metrics="temp")
    )
    assert hourly.json()["series"] == {
        "temp": [{"t": "2026-12-01T10:00:00.000Z", "max": 100.0, "count": 11}]
    }


async def test_the_last_bucket_is_whole_whether_rolled_up_or_not(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """A bucket that starts before `to` holds its readings after `to` too, and the same
    ones before the rollups count them as after (the rollups hold whole minutes)."""
    await readings_at(pool, "t1", [("d1", T0 + 10 * S, {"temp": 1.0})])
    await readings_at(pool, "t1", [("d1", T0 + 40 * S, {"temp": 2.0})])
    await readings_at(pool, "t1", [("d1", T0 + 61 * S, {"temp": 3.0})])
    params = {"from": iso(T0), "to": iso(T0 + 30 * S), "bucket": "1m", "agg": "count,last"}
    whole = [{"t": "2026-12-01T10:00:00.000Z", "count": 2, "last": 2.0}]
    r = await http.get(DEVICE.format("d1"), params=params)
    assert r.json()["series"] == {"temp": whole}
    async with pool.acquire() as conn:
        await roll_up_once(conn)
    r = await http.get(DEVICE.format("d1"), params=params)
    assert r.json()["series"] == {"temp": whole}
    assert r.json()["to"] == "2026-12-01T10:00:30.000Z"  # the range asked for


async def test_auto_picks_raw_points_then_buckets(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await readings_at(pool, "t1", [("d1", T0 + i * S, {"temp": float(i)}) for i in range(3)])
    few = (await http.get(DEVICE.format("d1"), params=window(agg="last,count"))).json()
    assert few["bucket"] == "raw"
    assert few["series"]["temp"] == [
        {"t": iso(T0 + i * S).replace("Z", ".000Z"), "last": float(i), "count": 1} for i in range(3)
    ]
    await readings_at(pool, "t1", [("d1", T0 + i * S, {"temp": 1.0}) for i in range(1000)])
    week = {"from": iso(T0), "to": iso(T0 + timedelta(days=7))}
    many = (await http.get(DEVICE.format("d1"), params=week)).json()
    assert many["bucket"] == "15m"  # 672 buckets in 7 days; 5m would be 2016
    # 10:00-10:15 holds the first 900 readings and the 3 of before; 10:15-10:30 the rest.
    assert [p["count"] for p in many["series"]["temp"]] == [903, 100]


async def test_auto_picks_raw_points_only_when_their_points_fit(
    http: httpx.AsyncClient, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the history audit: auto picked raw points by the readings alone, then
    refused its own pick (1000 readings of 150 metrics: 150,000 points, 400) where
    minutes fitted. It counts their points, and falls back to a width that fits the
    metrics' series."""
    for module in ("params", "reads"):
        monkeypatch.setattr(f"pulse.history.{module}.MAX_ANSWER_POINTS", 50)
    metrics = {f"m{i}": float(i) for i in range(6)}
    await readings_at(pool, "t1", [("d1", T0 + i * 10 * S, metrics) for i in range(10)])
    r = await http.get(DEVICE.format("d1"), params=window(agg="count"))  # raw: 60 points
    assert r.status_code == 200, r.text
    # 1m would be 6 series of up to 12 buckets, 72 points; 5m, 6 of up to 4.
    assert r.json()["bucket"] == "5m"
    assert {m: sum(p["count"] for p in s) for m, s in r.json()["series"].items()} == {
        m: 10 for m in metrics
    }
    r = await http.get(DEVICE.format("d1"), params=window(metrics="m0,m1"))  # 20 points
    assert r.status_code == 200 and r.json()["bucket"] == "raw", r.text
    assert [len(s) for s in r.json()["series"].values()] == [10, 10]


async def test_raw_readings_come_in_pages(http: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    ids = await readings_at(
        pool,
        "t1",
        [("d1", T0 + (i % 5) * S, {"temp": float(i), "hum": 2.0}) for i in range(23)]
        + [("d1", T0, {"hum": 3.0}), ("d2", T0, {"temp": 9.0})],
    )
    seen: list[dict[str, object]] = []
    cursor = None
    pages = 0
    while True:
        params = window(bucket="raw", limit=10, metrics="temp")
        if cursor:
            params["cursor"] = cursor
        body = (await http.get(DEVICE.format("d1"), params=params)).json()
        seen += body["readings"]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == 3
    # By device time, then id; only temp; the reading without temp left out.
    expected = sorted(ids[:23], key=lambda i: ((i - ids[0]) % 5, i))
    assert [r["id"] for r in seen] == expected
    assert seen[0] == {"id": ids[0], "time": "2026-12-01T10:00:00.000Z", "metrics": {"temp": 0.0}}


async def test_exports_stream_every_reading(http: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    await readings_at(
        pool,
        "t1",
        [("d1", T0 + i * 100_000 * S / 2500, {"temp": i, "on": True}) for i in range(2500)],
    )
    params = {"from": iso(T0), "to": iso(T0 + timedelta(days=2))}
    async with http.stream(
        "GET", DEVICE.format("d1"), params=params, headers={"Accept": "text/csv"}
    ) as r:
        assert r.headers["content-type"].startswith("text/csv")
        text = "".join([chunk async for chunk in r.aiter_text()])
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["id", "time", "metric", "value"]
    assert len(rows) == 1 + 5000
    assert rows[1:3] == [["1", "2026-12-01T10:00:00.000Z", "on", "true"],
                         ["1", "2026-12-01T10:00:00.000Z", "temp", "0"]]  # fmt: skip
    ndjson = await http.get(
        DEVICE.format("d1"), params=params, headers={"Accept": "application/x-ndjson"}
    )
    assert ndjson.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in ndjson.text.splitlines()]
    assert len(lines) == 2500 and lines[-1]["metrics"] == {"temp": 2499, "on": True}
    # A reading every 40 s from 10:00: 14 h (1260 readings) on the first day.
    buckets = await http.get(
        DEVICE.format("d1"),
        params={**params, "bucket": "1d", "agg": "count", "metrics": "temp"},
        headers={"Accept": "text/csv"},
    )
    assert list(csv.reader(io.StringIO(buckets.text))) == [
        ["device_id", "metric", "t", "count"],
        ["d1", "temp", "2026-12-01T00:00:00.000Z", "1260"],
        ["d1", "temp", "2026-12-02T00:00:00.000Z", "1240"],
    ]


async def test_a_sum_past_a_doubles_range_leaves_the_average_out(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    big = 1.5e308  # any finite value is a reading; two of them sum past the range
    await readings_at(pool, "t1", [("d1", T0, {"v": big}), ("d1", T0 + S, {"v": big})])
    async with pool.acquire() as conn:
        await roll_up_once(conn)
    # One more, not counted yet: the series adds it to the bucket's infinite sum.
    await readings_at(pool, "t1", [("d1", T0 + 2 * S, {"v": big}), ("d1", T0 + 61 * S, {"v": 1.0})])
    expected = [
        {"t": "2026-12-01T10:00:00.000Z", "avg": None, "min": big, "max": big, "last": big,
         "count": 3},
        {"t": "2026-12-01T10:01:00.000Z", "avg": 1.0, "min": 1.0, "max": 1.0, "last": 1.0,
         "count": 1},
    ]  # fmt: skip
    r = await http.get(DEVICE.format("d1"), params=window(bucket="1m"))
    assert r.status_code == 200, r.text
    assert r.json()["series"] == {"v": expected}
    fleet = await http.get(FLEET, params=window(bucket="1h", metric="v", device_id="d1"))
    assert fleet.status_code == 200, fleet.text
    [hour] = fleet.json()["series"]["d1"]
    assert (hour["avg"], hour["max"], hour["count"]) == (None, big, 4)
    export = await http.get(
        DEVICE.format("d1"),
        params=window(bucket="1m", agg="avg,count"),
        headers={"Accept": "text/csv"},
    )
    assert list(csv.reader(io.StringIO(export.text))) == [
        ["device_id", "metric", "t", "avg", "count"],
        ["d1", "v", "2026-12-01T10:00:00.000Z", "", "3"],
        ["d1", "v", "2026-12-01T10:01:00.000Z", "1.0", "1"],
    ]


async def test_fleet_form_has_one_series_per_device(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    await readings_at(
        pool,
        "t1",
        [
            ("d1", T0, {"temp": 1.0}),
            ("d2", T0, {"temp": 2.0, "hum": 5.0}),
            ("d2", T0, {"hum": 1.0}),
        ],
    )
    await readings_at(pool, "t2", [("other", T0, {"temp": 50.0})])
    body = (await http.get(FLEET, params=window(metric="temp", agg="avg"))).json()
    assert body["metric"] == "temp" and body["bucket"] == "1m"
    assert body["series"] == {
        "d1": [{"t": "2026-12-01T10:00:00.000Z", "avg": 1.0}],
        "d2": [{"t": "2026-12-01T10:00:00.000Z", "avg": 2.0}],
    }
    only = (await http.get(FLEET, params=window(metric="temp", device_id="d2"))).json()
    assert list(only["series"]) == ["d2"]
    assert only["bucket"] == "1m"  # auto picks by the range only, even for one device


async def test_a_range_with_only_its_end_is_the_hour_before_it(
    http: httpx.AsyncClient,
) -> None:
    r = await http.get(DEVICE.format("d1"), params={"to": iso(T0), "bucket": "1h"})
    assert r.status_code == 200, r.text
    assert (r.json()["from"], r.json()["to"]) == (
        "2026-12-01T09:00:00.000Z",
        "2026-12-01T10:00:00.000Z",
    )


@pytest.mark.parametrize(
    ("path", "params", "status", "error"),
    [
        (DEVICE.format("ghost"), {}, 404, "unknown_device"),
        (DEVICE.format("other"), {}, 404, "unknown_device"),  # t2's device
        (DEVICE.format("d1"), {"from": "yesterday"}, 400, "invalid_parameter"),
        (DEVICE.format("d1"), {"from": iso(T0), "to": iso(T0)}, 400, "invalid_parameter"),
        (DEVICE.format("d1"), {"bucket": "2m"}, 400, "invalid_parameter"),
        (DEVICE.format("d1"), {"agg": "median"}, 400, "invalid_parameter"),
        (DEVICE.format("d1"), {"metrics": "bad name!"}, 400, "invalid_parameter"),
        (DEVICE.format("d1"), {"bucket": "raw", "limit": "0"}, 400, "invalid_parameter"),
        # Not ASCII digits: '²' is a digit to str.isdigit, and int() refuses it.
        (DEVICE.format("d1"), {"bucket": "raw", "limit": "²"}, 400, "invalid_parameter"),
        (DEVICE.format("d1"), {"bucket": "raw", "limit": "\u0661\u0660"}, 400, "invalid_parameter"),
        # A name no device can have (PostgreSQL refuses a NUL in text): no query is made.
        (DEVICE.format("a%00b"), {}, 404, "unknown_device"),
        (DEVICE.format("d1"), {"bucket": "raw", "cursor": "x"}, 400, "invalid_parameter"),
        # An id past a bigint reached PostgreSQL, and came back a 500.
        (
            DEVICE.format("d1"),
            {"bucket": "raw", "cursor": "1.9223372036854775808"},
            400,
            "invalid_parameter",
        ),
        (FLEET, {}, 400, "invalid_parameter"),
        (FLEET, {"metric": "temp", "bucket": "raw"}, 400, "invalid_parameter"),
        (DEVICE.format("d1"), {"tenant_id": "t2"}, 403, "forbidden"),
    ],
)
async def test_bad_requests(
    http: httpx.AsyncClient, path: str, params: dict[str, str], status: int, error: str
) -> None:
    r = await http.get(path, params=params)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error


async def test_auto_picks_a_width_whose_rollups_are_still_kept(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    # Three days that ended 40 days ago: 5-minute buckets by the span alone (864), but
    # minutes are kept 30 days; the 15 minutes, 90.
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(days=40)
    start = end - timedelta(days=3)
    minute = timedelta(minutes=1)
    await readings_at(pool, "t1", [("d1", start + i * minute, {"temp": 1.0}) for i in range(1200)])
    async with pool.acquire() as conn:
        await roll_up_once(conn)
        assert await trim(conn, RollupSettings()) > 0
    r = await http.get(DEVICE.format("d1"), params={"from": iso(start), "to": iso(end)})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bucket"] == "15m"
    assert sum(p["count"] for p in body["series"]["temp"]) == 1200


async def test_auto_takes_rollups_for_a_range_older_than_retention(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """Raw readings older than retention are gone (or partly, by day): a range before
    its horizon counted few readings, and bucket=auto showed what was left, often
    nothing, while the rollups still held all of it."""
    day = (datetime.now(UTC) - timedelta(days=9)).replace(minute=0, second=0, microsecond=0)
    hour = timedelta(hours=1)
    await readings_at(pool, "t1", [("d1", day + i * hour, {"temp": 1.0}) for i in range(24)])
    async with pool.acquire() as conn:
        await roll_up_once(conn)
    # What retention does to them (7 days, PULSE_RETENTION_HOURS=168 by default).
    await pool.execute("DELETE FROM telemetry WHERE tenant_id = 't1'")
    span = {"from": iso(day), "to": iso(day + timedelta(days=1))}
    body = (await http.get(DEVICE.format("d1"), params=span)).json()
    assert body["bucket"] == "5m"  # 1m would be 1440 points
    assert sum(p["count"] for p in body["series"]["temp"]) == 24
    # An export with bucket=auto takes them too, as buckets.
    r = await http.get(DEVICE.format("d1"), params=span, headers={"Accept": "text/csv"})
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == ["device_id", "metric", "t", "avg", "min", "max", "last", "count"]
    assert sum(int(row[-1]) for row in rows[1:]) == 24


async def test_auto_counts_the_metrics_asked_for_in_a_range_older_than_retention(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """From the review of 7 December: past raw retention, bucket=auto picked its width
    for one series, then refused the answer for the 100 metrics asked for (`100 series of
    up to 1001 buckets of 15m would be more than 100000 points`) where hours fitted."""
    start = (datetime.now(UTC) - timedelta(days=20)).replace(minute=0, second=0, microsecond=0)
    names = [f"m{i:03d}" for i in range(100)]
    await readings_at(pool, "t1", [("d1", start + timedelta(minutes=1), dict.fromkeys(names, 1.0))])
    async with pool.acquire() as conn:
        await roll_up_once(conn)
    await pool.execute("DELETE FROM telemetry WHERE tenant_id = 't1'")  # as retention does
    end = start + 999.5 * timedelta(minutes=15)  # 15-minute buckets for one series
    span = {"from": iso(start), "to": iso(end), "metrics": ",".join(names)}
    r = await http.get(DEVICE.format("d1"), params=span)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["bucket"] == "1h"
    assert [sum(p["count"] for p in body["series"][name]) for name in names] == [1] * 100


async def test_auto_takes_rollups_until_retention_surely_keeps_every_reading(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """From the history audit: retention drops a day of readings by when they arrived,
    and a device's clock may be 5 minutes ahead of that. Right after a day was dropped,
    a range starting just after the horizon took raw points and left out a reading
    that arrived before it with a device time after it; the rollups hold it."""
    now = datetime.now(UTC)
    horizon = datetime.combine(now.date() - timedelta(days=8), time(), UTC)
    minute = timedelta(minutes=1)
    await provision_device(pool, "t1", "d1")
    await create_partitions(seam(pool), horizon.date() - timedelta(days=1), horizon.date())
    # (device time, received at): the first arrived a minute before midnight, 4 minutes
    # ahead.
    arrivals = [(horizon + 3 * minute, horizon - minute), (horizon + 4 * minute, horizon)]
    await readings_received(pool, "t1", "d1", arrivals)
    async with pool.acquire() as conn:
        await roll_up_once(conn)
    assert await drop_expired(seam(pool), horizon) == [f"telemetry_p{horizon - minute:%Y%m%d}"]
    # The server's retention horizon is that midnight (and moves on from it with time).
    hours = (now - horizon) / timedelta(hours=1)
    span = {"from": iso(horizon + 2 * minute), "to": iso(horizon + 10 * minute)}
    async with (
        running_server(dataclasses.replace(settings, retention_hours=hours)) as url,
        httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {make_token('t1')}"}
        ) as http,
    ):
        r = await http.get(DEVICE.format("d1"), params={**span, "agg": "count"})
        assert r.status_code == 200, r.text
        assert r.json()["bucket"] == "1m"
        assert [p["count"] for p in r.json()["series"]["temp"]] == [1, 1]
        # 5 minutes after the horizon, every reading is surely kept: raw points.
        later = {**span, "from": iso(horizon + 6 * minute)}
        assert (await http.get(DEVICE.format("d1"), params=later)).json()["bucket"] == "raw"


async def readings_received(
    pool: asyncpg.Pool, tenant: str, device: str, arrivals: list[tuple[datetime, datetime]]
) -> None:
    """Commit readings with these (device time, time of receipt)."""
    async with pool.acquire() as conn, conn.transaction():
        base = await conn.fetchval("SELECT pulse_reserve_event_ids($1, $2)", tenant, len(arrivals))
        await conn.executemany(
            """INSERT INTO telemetry (tenant_id, id, device_id, device_time, received_at, metrics)
               VALUES ($1, $2, $3, $4, $5, '{"temp": 1}')""",
            [(tenant, base + n, device, t, at) for n, (t, at) in enumerate(arrivals, 1)],
        )


async def test_a_json_answer_holds_at_most_max_answer_points(
    http: httpx.AsyncClient, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One of 2,000 devices' week at 15 minutes was 1.3 million points, 130 MB of JSON
    built on the event loop: the process answered nothing else for seconds. auto picks
    a width that fits the devices too; a width asked for that does not is refused."""
    monkeypatch.setattr("pulse.history.params.MAX_ANSWER_POINTS", 50)
    await readings_at(pool, "t1", [(d, T0, {"temp": 1.0}) for d in ("d1", "d2")])
    span = {"from": iso(T0), "to": iso(T0 + timedelta(days=1)), "metric": "temp"}
    body = (await http.get(FLEET, params=span)).json()
    # 2 series: 1h would be 2 x 26 buckets; one device's would have been 5m.
    assert body["bucket"] == "1d" and list(body["series"]) == ["d1", "d2"]
    r = await http.get(FLEET, params={**span, "bucket": "1h"})
    assert r.status_code == 400 and r.json()["error"] == "invalid_parameter"
    assert "export" in r.json()["detail"], r.text
    r = await http.get(FLEET, params={**span, "bucket": "1h"}, headers={"Accept": "text/csv"})
    assert r.status_code == 200 and len(r.text.splitlines()) == 3  # exports stream
    device = {"from": iso(T0), "to": iso(T0 + timedelta(days=1)), "bucket": "1m"}
    r = await http.get(DEVICE.format("d1"), params=device)
    assert r.status_code == 400 and r.json()["error"] == "invalid_parameter"
    r = await http.get(DEVICE.format("d1"), params={**device, "bucket": "1h"})
    assert r.status_code == 200 and r.json()["series"]["temp"][0]["count"] == 1


async def test_a_device_answer_holds_at_most_100_series(
    http: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """From the hostile audit (H2): a device that sent 200 new metric names in each of
    500 readings answered its default history as 100,000 series of one point, 9.7 MB
    built on the event loop for 4 s, while every other tenant waited. A device's answer
    holds at most as many series as metrics may name (100): past it, the same 400 as
    too many points, saying to name them; the fleet form and exports are unchanged."""
    names = [f"m{i:03d}" for i in range(101)]
    await readings_at(
        pool, "t1", [("d1", T0, dict.fromkeys(names[:100], 1.0)), ("d1", T0 + S, {"m100": 2.0})]
    )
    # auto: raw points of the two readings; 1m: buckets.
    for params in (window(agg="count"), window(agg="count", bucket="1m")):
        r = await http.get(DEVICE.format("d1"), params=params)
        assert r.status_code == 400 and r.json()["error"] == "invalid_parameter", r.text
        detail = r.json()["detail"]
        assert "more than 100 metrics" in detail and "metrics" in detail and "export" in detail
    r = await http.get(DEVICE.format("d1"), params=window(agg="count", metrics=",".join(names[1:])))
    assert r.status_code == 200, r.text
    series = r.json()["series"]
    assert list(series) == names[1:] and series["m100"] == [
        {"t": "2026-12-01T10:00:01.000Z", "count": 1}
    ]
    r = await http.get(DEVICE.format("d1"), params=window(metrics=",".join(names[:100])))
    assert r.status_code == 200 and len(r.json()["series"]) == 100
    r = await http.get(FLEET, params={**window(), "metric": "m100"})
    assert r.status_code == 200 and list(r.json()["series"]) == ["d1"]
    r = await http.get(DEVICE.format("d1"), params=window(), headers={"Accept": "text/csv"})
    assert r.status_code == 200 and len(r.text.splitlines()) == 1 + 101


async def test_a_device_answer_without_metrics_counts_every_metric_s_points(
    http: httpx.AsyncClient, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the time audit: the cap counted one series when no metric was named, and a
    device of 150 metrics answered 123,750 points (a range of minutes over 69 days would
    have been millions, held in memory). The rows are counted as they come: past the cap,
    the same 400 as a size refused beforehand."""
    for module in ("params", "reads"):
        monkeypatch.setattr(f"pulse.history.{module}.MAX_ANSWER_POINTS", 50)
    metrics = {f"m{i}": float(i) for i in range(60)}
    await readings_at(pool, "t1", [("d1", T0, metrics)])
    span = {"from": iso(T0), "to": iso(T0 + timedelta(days=1)), "bucket": "1h"}
    r = await http.get(DEVICE.format("d1"), params=span)  # 26 buckets of 1 series: asked
    assert r.status_code == 400 and r.json()["error"] == "invalid_parameter", r.text
    assert "more than 50 points" in r.json()["detail"] and "export" in r.json()["detail"]
    r = await http.get(DEVICE.format("d1"), params={**span, "metrics": "m1"})
    assert r.status_code == 200 and set(r.json()["series"]) == {"m1"}, r.text
