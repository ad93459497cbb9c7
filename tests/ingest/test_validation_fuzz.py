"""Ingest validation under generated input (hypothesis): anything a device can send is
either a well-formed reading or an invalid_payload rejection, never an exception."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pulse.errors import INVALID_DEVICE_TOKEN, INVALID_PAYLOAD
from pulse.ingest import intake
from pulse.ingest.model import Rejected, Submission
from pulse.names import is_valid_name

NOW = datetime(2026, 11, 27, 17, 0, tzinfo=UTC)

names = st.one_of(st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True), st.text(max_size=70))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=20,
)
# Any fixed offset a time zone can have, down to the microsecond: near the ends of the
# calendar, converting such a time to UTC leaves it (year 0 or 10000).
offsets = st.timedeltas(
    min_value=-timedelta(hours=24) + timedelta(microseconds=1),
    max_value=timedelta(hours=24) - timedelta(microseconds=1),
).map(timezone)
times = st.one_of(
    st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat()),
    st.datetimes(timezones=offsets).map(lambda t: t.isoformat()),
    st.datetimes().map(lambda t: t.isoformat()),
    st.text(max_size=30),
    st.integers(),
)
readings = st.fixed_dictionaries(
    {"metrics": st.dictionaries(names, json_values, max_size=8)},
    optional={"ts": times, "seq": json_values, "extra": json_values},
)


def check(item: Submission | Rejected) -> None:
    if isinstance(item, Rejected):
        assert item.reason in (INVALID_PAYLOAD, INVALID_DEVICE_TOKEN), item
        assert item.detail and "Traceback" not in item.detail
        return
    reading = item.reading
    assert reading is not None
    assert 1 <= len(reading.metrics) <= 200
    for name, value in reading.metrics.items():
        assert is_valid_name(name)
        assert isinstance(value, bool) or (isinstance(value, int | float) and math.isfinite(value))
    assert reading.device_time.tzinfo is not None
    assert reading.device_time <= NOW + timedelta(minutes=5)
    assert reading.seq is None or (
        isinstance(reading.seq, int) and not isinstance(reading.seq, bool)
    )


@settings(max_examples=150, deadline=None)
@given(body=st.one_of(readings, json_values))
def test_any_json_body_is_a_reading_or_invalid_payload(body: Any) -> None:
    check(intake.reading("t1", "dev-1", "token", json.dumps(body).encode(), NOW))


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=200))
def test_any_bytes_are_a_reading_or_invalid_payload(raw: bytes) -> None:
    check(intake.reading("t1", "dev-1", "token", raw, NOW))


@settings(max_examples=60, deadline=None)
@given(
    messages=st.lists(
        st.one_of(
            readings.map(
                lambda r: {**r, "tenant_id": "t1", "device_id": "d", "provision_token": "x"}
            ),
            json_values,
        ),
        max_size=5,
    )
)
def test_every_batch_message_is_judged_alone(messages: list[Any]) -> None:
    result = intake.batch(json.dumps({"messages": messages}).encode(), NOW)
    if isinstance(result, Rejected):
        assert result.reason == INVALID_PAYLOAD
        return
    assert len(result) == len(messages)
    for item in result:
        check(item)


@settings(max_examples=300, deadline=None)
@given(moment=st.datetimes(timezones=offsets))
@example(moment=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))))
# Python 3.11's fromisoformat drops an offset's fraction of a second (found by this test).
@example(moment=datetime(2000, 1, 1, tzinfo=timezone(timedelta(microseconds=1))))
@example(moment=datetime(2000, 1, 1, tzinfo=timezone(-timedelta(seconds=1, microseconds=5))))
@example(moment=datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-14))))
def test_any_time_with_any_offset_is_a_reading_or_invalid_payload(moment: datetime) -> None:
    body = {"ts": moment.isoformat(), "metrics": {"v": 1}}
    item = intake.reading("t1", "dev-1", "token", json.dumps(body).encode(), NOW)
    check(item)
    if isinstance(item, Submission):
        assert item.reading is not None and item.reading.device_time == moment
    else:
        # Refused only for a reason a sender can act on: beyond the calendar in UTC,
        # or more than 5 minutes ahead of the server's clock.
        assert "outside the years" in item.detail or "ahead of the server clock" in item.detail
