"""The history API's parameters, without I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pulse.errors import ApiError
from pulse.history.params import CLOCK_AHEAD, Cursor, parse_history

NOW = datetime(2026, 12, 4, 18, 0, tzinfo=UTC)


def test_defaults_are_the_last_hour_and_everything_committed() -> None:
    query = parse_history({}, now=NOW)
    assert (query.start, query.end) == (NOW - timedelta(hours=1), NOW + CLOCK_AHEAD)
    assert query.bucket == "auto" and query.metrics is None and query.limit == 1000
    assert query.aggregates == ("avg", "min", "max", "last", "count")


@pytest.mark.parametrize(
    ("hours", "width"),
    [(1, "1m"), (16, "1m"), (17, "5m"), (24 * 7, "15m"), (24 * 30, "1h"), (24 * 60, "1d")],
)
def test_auto_keeps_a_series_within_about_1000_buckets(hours: int, width: str) -> None:
    args = {"from": (NOW - timedelta(hours=hours)).isoformat(), "to": NOW.isoformat()}
    assert parse_history(args, now=NOW).width_for_span() == width


def test_times_without_an_offset_are_utc_and_others_are_converted() -> None:
    query = parse_history(
        {"from": "2026-12-04T10:00:00", "to": "2026-12-04T12:00:00+01:00"}, now=NOW
    )
    assert query.start == datetime(2026, 12, 4, 10, tzinfo=UTC)
    assert query.end == datetime(2026, 12, 4, 11, tzinfo=UTC)


def test_names_and_aggregates_are_kept_once_in_order() -> None:
    query = parse_history({"metrics": "temp,hum,temp", "agg": "max,avg,max"}, now=NOW)
    assert query.metrics == ("temp", "hum") and query.aggregates == ("max", "avg")


@pytest.mark.parametrize(
    "cursor",
    [
        Cursor(datetime(2026, 12, 1, 10, 0, 0, 123456, tzinfo=UTC), 42),
        Cursor(datetime(1902, 1, 1, tzinfo=UTC), 2**63 - 1),  # before 1970: negative
    ],
)
def test_a_cursor_reads_back_what_it_wrote(cursor: Cursor) -> None:
    assert parse_history({"cursor": cursor.encode()}, now=NOW).cursor == cursor


@pytest.mark.parametrize(
    "args",
    [
        {"from": "noon"},
        {"from": "2026-12-04T12:00:00Z", "to": "2026-12-04T11:00:00Z"},
        {"bucket": "10m"},
        {"agg": "p99"},
        {"metrics": "a b"},
        {"limit": "10001"},
        {"cursor": "12.x"},
        {"cursor": "1.9223372036854775808"},  # an id past a bigint (was a 500)
        {"cursor": "1.99999999999999999999"},
        {"cursor": "\u0661\u0662.\u0663"},  # Arabic-Indic digits: int() reads them
        {"cursor": "1_000.2"},
        {"cursor": " 1.2"},
        {"cursor": "+1.2"},
        {"from": "9999-12-31T23:59:59Z"},
    ],
)
def test_bad_values_are_invalid_parameters(args: dict[str, str]) -> None:
    with pytest.raises(ApiError) as raised:
        parse_history(args, now=NOW)
    assert raised.value.code == "invalid_parameter"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        # An offset's + typed in a URL arrives as a space.
        ({"from": "2026-12-06T10:00:00 05:45"}, "send it as %2B"),
        ({"to": "9999-12-31T00:00:00Z"}, "from 0001-01-02 to 9999-12-30"),
        ({"from": "0001-01-01T03:00:00+05:00"}, "from 0001-01-02 to 9999-12-30"),
    ],
)
def test_a_bad_time_says_what_is_wrong_with_it(args: dict[str, str], says: str) -> None:
    with pytest.raises(ApiError) as raised:
        parse_history(args, now=NOW)
    assert says in raised.value.detail, raised.value.detail


def test_the_fleet_form_needs_one_metric_and_no_raw() -> None:
    query = parse_history({"metric": "temp", "device_id": "d1,d2"}, now=NOW, fleet=True)
    assert query.metrics == ("temp",) and query.devices == ("d1", "d2")
    for args in ({}, {"metric": "temp,hum"}, {"metric": "temp", "bucket": "raw"}):
        with pytest.raises(ApiError):
            parse_history(args, now=NOW, fleet=True)


def test_auto_skips_widths_whose_rollups_are_no_longer_kept() -> None:
    args = {
        "from": (NOW - timedelta(days=43)).isoformat(),
        "to": (NOW - timedelta(days=40)).isoformat(),
    }
    query = parse_history(args, now=NOW)
    assert query.width_for_span() == "5m"
    kept = {
        1: NOW - timedelta(days=30),
        15: NOW - timedelta(days=90),
        60: NOW - timedelta(days=730),
    }
    assert query.width_for_span(kept) == "15m"
    assert query.width_for_span({**kept, 15: NOW - timedelta(days=35)}) == "1h"
