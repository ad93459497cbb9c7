"""Every rule of a reading, without a database."""

from __future__ import annotations

import operator
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pulse.ingest.validation import (
    BEYOND_DOUBLE,
    MAX_LARGE_NUMBERS,
    MAX_METRICS,
    InvalidPayload,
    Reading,
    _json_kind,
    _quote,
    decode_json,
    is_metric_value,
    is_string,
    parse_metrics,
    parse_reading,
    parse_seq,
)
from pulse.names import is_valid_name
from pulse.times import format_time

NOW = datetime(2026, 11, 27, 17, 0, 0, 123456, tzinfo=UTC)


def parse(body: object) -> Reading:
    return parse_reading(body, NOW)


def rejected(body: object) -> str:
    with pytest.raises(InvalidPayload) as info:
        parse(body)
    assert info.value.code == "invalid_payload"
    assert info.value.detail.endswith((".", "-")), info.value.detail
    return info.value.detail


def test_minimal_reading_uses_receive_time() -> None:
    reading = parse({"metrics": {"temp": 21.5}})
    assert reading == Reading(device_time=NOW, metrics={"temp": 21.5}, seq=None)


def test_full_reading() -> None:
    reading = parse(
        {"ts": "2026-11-27T16:59:00.250Z", "metrics": {"temp": 21.5, "door": True}, "seq": 7}
    )
    assert reading.device_time == datetime(2026, 11, 27, 16, 59, 0, 250000, tzinfo=UTC)
    assert reading.metrics == {"temp": 21.5, "door": True}
    assert reading.seq == 7


def test_null_ts_and_seq_mean_absent() -> None:
    assert parse({"metrics": {"a": 1}, "ts": None, "seq": None}) == Reading(NOW, {"a": 1}, None)


@pytest.mark.parametrize("body", [[], "x", 3, None, True, [{"metrics": {"a": 1}}]])
def test_not_an_object(body: object) -> None:
    assert "must be a JSON object" in rejected(body)


def test_unknown_field() -> None:
    assert "'timestamp'" in rejected({"metrics": {"a": 1}, "timestamp": "x"})


@pytest.mark.parametrize(
    ("metrics", "words"),
    [
        (None, "missing"),
        ({}, "empty"),
        ([1, 2], "must be a JSON object, not an array"),
        ("temp=1", "not a string"),
        (3, "not an integer"),
    ],
)
def test_metrics_shape(metrics: object, words: str) -> None:
    body = {} if metrics is None else {"metrics": metrics}
    assert words in rejected(body)


def test_metric_count_limit() -> None:
    exactly = {f"m{i}": i for i in range(MAX_METRICS)}
    assert len(parse({"metrics": exactly}).metrics) == MAX_METRICS
    over = {f"m{i}": i for i in range(MAX_METRICS + 1)}
    assert "201 entries; at most 200" in rejected({"metrics": over})


@pytest.mark.parametrize("name", ["", "has space", "a/b", "é", "x" * 65, "semi;colon"])
def test_invalid_metric_names(name: str) -> None:
    assert "is invalid" in rejected({"metrics": {name: 1}})


def test_valid_metric_name_characters() -> None:
    name = "Az09_.:-" + "x" * 56
    assert parse({"metrics": {name: 1}}).metrics == {name: 1}


def test_long_names_are_not_echoed_in_full() -> None:
    detail = rejected({"metrics": {"x" * 5000: 1}})
    assert len(detail) < 300


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (float("nan"), "NaN"),
        (float("inf"), "infinite"),
        (float("-inf"), "infinite"),
        ("21.5", "a string"),
        (None, "null"),
        ([1], "an array"),
        ({"v": 1}, "an object"),
        (2**64, "beyond 64 bits"),
    ],
)
def test_metric_values_must_be_finite_numbers_or_booleans(value: object, kind: str) -> None:
    detail = rejected({"metrics": {"temp": value}})
    assert "finite number or a boolean" in detail
    assert kind in detail


@pytest.mark.parametrize(
    "value", [0, -1, 2**63, 2**64 - 1, -(2**63), 1.5, -0.0, 1e308, True, False]
)
def test_accepted_metric_values(value: object) -> None:
    assert parse({"metrics": {"v": value}}).metrics == {"v": value}


def test_ts_offsets_are_converted_to_utc() -> None:
    reading = parse({"ts": "2026-11-27T18:00:00+02:00", "metrics": {"a": 1}})
    assert reading.device_time == datetime(2026, 11, 27, 16, 0, tzinfo=UTC)
    assert reading.device_time.tzinfo is UTC


@pytest.mark.parametrize("ts", ["yesterday", "2026-13-01T00:00:00Z", "", "17:00"])
def test_ts_unparseable(ts: str) -> None:
    assert "is not an ISO-8601 time" in rejected({"ts": ts, "metrics": {"a": 1}})


@pytest.mark.parametrize("ts", [1764262800, 1.5, True, ["2026-11-27T17:00:00Z"]])
def test_ts_not_a_string(ts: object) -> None:
    assert "ts must be an ISO-8601 string" in rejected({"ts": ts, "metrics": {"a": 1}})


def test_ts_without_offset_is_ambiguous() -> None:
    assert "no UTC offset" in rejected({"ts": "2026-11-27T17:00:00", "metrics": {"a": 1}})


def test_ts_up_to_five_minutes_ahead_is_accepted() -> None:
    ahead = NOW + timedelta(minutes=5)
    reading = parse({"ts": ahead.isoformat(), "metrics": {"a": 1}})
    assert reading.device_time == ahead


def test_ts_more_than_five_minutes_ahead_is_rejected() -> None:
    ahead = NOW + timedelta(minutes=5, milliseconds=1)
    detail = rejected({"ts": ahead.isoformat(), "metrics": {"a": 1}})
    assert "ahead of the server clock" in detail
    assert format_time(NOW) in detail


def test_ts_in_the_past_is_accepted() -> None:
    old = datetime(2001, 1, 1, tzinfo=timezone(timedelta(hours=-5)))
    assert parse({"ts": old.isoformat(), "metrics": {"a": 1}}).device_time == old


@pytest.mark.parametrize(
    "ts", ["0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00.5+00:01", "9999-12-31T23:59:59-14:00"]
)
def test_ts_beyond_the_calendar_in_utc(ts: str) -> None:
    assert "outside the years 1 to 9999" in rejected({"ts": ts, "metrics": {"a": 1}})


@pytest.mark.parametrize("ts", ["0001-01-01T00:00:00Z", "0001-01-01T10:00:00+10:00"])
def test_ts_at_the_first_moment_of_the_calendar(ts: str) -> None:
    assert parse({"ts": ts, "metrics": {"a": 1}}).device_time == datetime(1, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("seq", [True, False, 1.0, "1", [1], {"n": 1}])
def test_seq_must_be_an_integer(seq: object) -> None:
    assert "seq must be an integer" in rejected({"metrics": {"a": 1}, "seq": seq})


@pytest.mark.parametrize("seq", [2**63, -(2**63) - 1])
def test_seq_must_fit_in_bigint(seq: int) -> None:
    assert "64-bit" in rejected({"metrics": {"a": 1}, "seq": seq})


@pytest.mark.parametrize("seq", [0, -5, 2**63 - 1])
def test_seq_accepted(seq: int) -> None:
    assert parse({"metrics": {"a": 1}, "seq": seq}).seq == seq


def test_decode_json() -> None:
    assert decode_json(b'{"a": 1}') == {"a": 1}
    for body in (b"", b"  \n", b"{", b"NaN", b'{"a": Infinity}', b"[1e400, NaN]"):
        with pytest.raises(InvalidPayload):
            decode_json(body)


def test_a_number_beyond_a_double_is_refused_as_a_value_not_as_the_body() -> None:
    """The integrity audit (LOW-1): ``1e400`` made the whole body invalid, and so a
    whole batch; it is decoded as a value that the checks refuse by name."""
    decoded = decode_json(b'{"metrics": {"a": 1, "b": 1e400}, "seq": 10000000000000000000000}')
    assert isinstance(decoded, dict) and decoded["seq"] == 1e22  # as orjson reads it
    with pytest.raises(InvalidPayload, match=r"Metric 'b' must be .* beyond the range of a double"):
        parse({"metrics": decoded["metrics"]})
    wide = decode_json(b"[18446744073709551615, -9223372036854775808, 18446744073709551616]")
    assert wide == orjson.loads(
        b"[18446744073709551615, -9223372036854775808, 18446744073709551616]"
    )
    assert [type(n) for n in wide] == [int, int, float]  # type: ignore[union-attr]
    for after in (b"NaN", b"Infinity", b'"\\ud800"', b'{"\\udfff": 1}', b"[" * 5000):
        with pytest.raises(InvalidPayload, match="not valid JSON"):
            decode_json(b"[1e400, " + after + b"]")


def test_a_number_beyond_a_double_in_a_string_stays_a_string() -> None:
    """Such a number is rewritten in the body as it stands before orjson decodes it
    again (review MEDIUM-3): only numbers, never the text of a string, whatever its
    escapes (an escaped quote, an escaped backslash before the closing quote)."""
    decoded = decode_json(
        b'{"ts": "1e400", "metrics": {"a": 1e400, "b": "1e400", "c": "x\\"1e400", '
        b'"d": "\\\\", "e": 2e308, "f": "-1' + b"0" * 400 + b'", "1e400": -1e400}}'
    )
    assert isinstance(decoded, dict)
    metrics = decoded["metrics"]
    assert metrics == {
        "a": BEYOND_DOUBLE,
        "b": "1e400",
        "c": 'x"1e400',
        "d": "\\",
        "e": BEYOND_DOUBLE,
        "f": "-1" + "0" * 400,
        "1e400": BEYOND_DOUBLE,
    }
    for name in ("b", "c", "f"):
        assert rejected({"metrics": {name: metrics[name]}}).endswith("not a string.")
    assert "'1e400' is not an ISO-8601 time" in rejected({"ts": decoded["ts"], "metrics": {"a": 1}})
    assert decode_json(b'["\\\\", 1e400, "\\"", -1e400]') == [
        "\\",
        BEYOND_DOUBLE,
        '"',
        BEYOND_DOUBLE,
    ]


def test_what_stands_for_a_number_beyond_a_double_cannot_be_sent() -> None:
    """It is a string (orjson must decode the rewritten body) that ends with a secret
    drawn when the process starts: what a device sends in its place, even next to a
    number beyond a double, is judged as what it is."""
    assert BEYOND_DOUBLE.startswith("\x00") and len(BEYOND_DOUBLE) > 16
    assert not is_string(BEYOND_DOUBLE) and is_string("") and is_string("\x00")
    shape = b'"\\u0000' + b"A" * (len(BEYOND_DOUBLE) - 1) + b'"'  # its shape, not its secret
    for forged in (b'"\\u0000"', b'"\\u0000beyond"', shape):
        decoded = decode_json(b'{"metrics": {"a": ' + forged + b', "b": 1e400}}')
        assert isinstance(decoded, dict) and is_string(decoded["metrics"]["a"])
        assert rejected({"metrics": {"a": decoded["metrics"]["a"]}}).endswith("not a string.")
    decoded = decode_json(b'{"metrics": {"a": {"\\u0000": 1}, "b": 1e400}}')
    assert isinstance(decoded, dict)
    assert rejected({"metrics": decoded["metrics"]}).endswith("not an object.")
    # Where it is read as anything but a number, it is named, never shown.
    assert rejected({"ts": BEYOND_DOUBLE, "metrics": {"a": 1}}) == (
        "ts must be an ISO-8601 string, not a number beyond the range of a double "
        "(about 1.8e308 either side of zero)."
    )
    assert "beyond the range" in rejected(BEYOND_DOUBLE)
    assert "beyond the range" in rejected({"metrics": BEYOND_DOUBLE})


def test_a_number_beyond_a_double_makes_json_of_nothing_that_is_not() -> None:
    """The rewrite puts a string where a whole, valid number was: whatever else is
    wrong with the body is still refused by orjson."""
    for after in (
        b"01e400",  # a leading zero
        b"1e400e5",
        b"--1e400",
        b"1.e400",
        b"1e400.5",
        b'"not closed, 1e400',
        b'"\\", \\1e400',
        b"\x00",
        b"tru1e400",
    ):
        with pytest.raises(InvalidPayload, match="not valid JSON"):
            decode_json(b"[1e400, " + after + b"]")
    # A double holds these, as orjson reads them (the largest double, rounded down).
    assert decode_json(
        b"[1e400, 1e308, 1.7976931348623158e308, 1.797693134862315808e308, 1e-400, "
        b"0." + b"0" * 400 + b"1e400, 1" + b"0" * 300 + b"e-250]"
    ) == [BEYOND_DOUBLE, 1e308, 1.7976931348623157e308, BEYOND_DOUBLE, 0.0, 0.1, 1e50]


def test_a_body_of_many_numbers_near_a_double_is_refused_whole() -> None:
    """Each number that may be beyond a double's range costs a step in Python: past
    MAX_LARGE_NUMBERS of them, a body with one that is is refused whole."""
    many = b",".join([b"1e300"] * (MAX_LARGE_NUMBERS - 1))
    assert decode_json(b"[1e400, " + many + b"]") == [BEYOND_DOUBLE] + [1e300] * (
        MAX_LARGE_NUMBERS - 1
    )
    with pytest.raises(InvalidPayload, match="refused whole"):
        decode_json(b"[1e400, " + many + b", 1e300]")
    # Without one (the common path, orjson's), there is no such limit.
    assert decode_json(b"[" + many + b", 1e300, 1e300]") == [1e300] * (MAX_LARGE_NUMBERS + 1)


def test_format_time() -> None:
    assert format_time(NOW) == "2026-11-27T17:00:00.123Z"
    other_zone = datetime(2026, 11, 27, 19, 0, tzinfo=timezone(timedelta(hours=2)))
    assert format_time(other_zone) == "2026-11-27T17:00:00.000Z"
    # Four digits for every year (glibc's strftime("%Y") wrote "99-01-01...").
    assert format_time(datetime(99, 1, 1, tzinfo=UTC)) == "0099-01-01T00:00:00.000Z"
    assert format_time(datetime(1, 2, 3, 4, 5, 6, 7890, tzinfo=UTC)) == "0001-02-03T04:05:06.007Z"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"metrics": {"t": 1}, "seq": 1.5}, "seq must be an integer, not a number with a fraction"),
        ({"metrics": {"t": 1}, "ts": 5}, "ts must be an ISO-8601 string, not an integer."),
        ({"metrics": {"t": 1}, "ts": 2.0}, "ts must be an ISO-8601 string, not a number."),
        ({"metrics": 2**70}, "not an integer beyond 64 bits"),
    ],
)
def test_what_a_wrong_value_is_called(body: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidPayload, match=re.escape(words)):
        parse(body)


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-11-27T16:59:00z", datetime(2026, 11, 27, 16, 59, tzinfo=UTC)),
        ("2026-11-27T16:59:59.9999995Z", datetime(2026, 11, 27, 17, 0, tzinfo=UTC)),
    ],
)
def test_times_are_read_as_the_fast_path_reads_them(ts: str, expected: datetime) -> None:
    assert parse({"metrics": {"t": 1}, "ts": ts}).device_time == expected


def explained_one_by_one(metrics: dict[Any, object]) -> dict[str, object] | str:
    """What parse_metrics answered when it checked each metric in Python, in order (as
    before the security audit's H1): the metrics, or the detail of the first wrong one."""
    for name, metric in metrics.items():
        if not is_valid_name(name):
            return (
                f"Metric name {_quote(name)} is invalid; names are 1 to 64 characters "
                "of letters, digits and _ . : -"
            )
        if not is_metric_value(metric):
            return (
                f"Metric {_quote(name)} must be a finite number or a boolean, "
                f"not {_json_kind(metric)}."
            )
    return dict(metrics)


good_names = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
good_values = st.one_of(
    st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False)
)
names = st.one_of(
    good_names,
    st.sampled_from(["", "x" * 64, "x" * 65, "a\nb", "\n", "a\n", "bad name", "é", "a\ud800"]),
    st.text(max_size=70),
    st.integers(),  # not from JSON, whose names are strings
)
values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(),  # NaN and infinities too: not from JSON
    st.sampled_from([2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**400, BEYOND_DOUBLE]),
    st.text(max_size=3),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.dictionaries(names, values, min_size=1, max_size=MAX_METRICS),
        # Many good metrics before the first wrong one, if any.
        st.builds(
            operator.or_,
            st.dictionaries(good_names, good_values, max_size=150),
            st.dictionaries(names, values, min_size=1, max_size=50),
        ),
    )
)
def test_metrics_are_judged_as_when_checked_one_by_one(metrics: dict[Any, object]) -> None:
    """The first wrong metric is found in compiled code, not metric by metric in Python
    (security audit, H1): the same metrics, or the same first error, for any of them."""
    expected = explained_one_by_one(metrics)
    if isinstance(expected, dict):
        assert parse_metrics(metrics) == expected
    else:
        with pytest.raises(InvalidPayload) as info:
            parse_metrics(metrics)
        assert info.value.detail == expected


@pytest.mark.parametrize(
    "wrong", [{"bad name": 1}, {"x" * 65: 1}, {"": 1}, {"a\nb": 1}, {"v": "x"}]
)
def test_the_first_wrong_metric_is_named_after_many_good_ones(wrong: dict[str, object]) -> None:
    good = {f"m{i}": i for i in range(150)}
    later = {"another bad name": None, "w": [1]}
    assert explained_one_by_one(good | wrong | later) == rejected({"metrics": good | wrong | later})


def test_an_int_subclass_is_checked_at_once() -> None:
    """`value in range(...)` walks the range for a subclass of int (no JSON decoder makes
    one, but an embedding program might): is_metric_value and parse_seq hung on one."""

    class Count(int):
        pass

    assert is_metric_value(Count(2**63)) and not is_metric_value(Count(2**64))
    assert parse_seq(Count(2**63 - 1)) == 2**63 - 1
    with pytest.raises(InvalidPayload, match="signed 64-bit"):
        parse_seq(Count(2**63))
