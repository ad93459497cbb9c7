"""The compiled intake (pulse.ingest.fast) against the checked one (pulse.ingest.intake):
whatever the fast path accepts, the checked path accepts with the same result; it
refuses (hands on) the rest, and the checked path names what is wrong."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pulse.ingest import fast, intake
from pulse.ingest.model import Submission
from pulse.ingest.validation import Reading

NOW = datetime(2026, 11, 27, 17, 0, tzinfo=UTC)

good_names = st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True)
names = st.one_of(good_names, good_names, st.text(max_size=70))
values = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.none(),
)
times = st.one_of(
    st.none(),
    st.datetimes(
        min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
    ).map(lambda t: t.isoformat()),
    st.sampled_from(
        [
            "2026-11-27T16:59:00Z",
            "2026-11-27T17:04:00+00:00",
            "2026-11-27T17:06:00Z",  # too far ahead
            "2026-11-27 16:00:00+02:00",
            "2026-11-27T16:00:00",  # no offset
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "2026-11-27T16:59:00z",  # lowercase: RFC 3339 allows it
            "2026-11-27T16:59:59.9999995Z",  # more than microseconds: rounded alike
            "2026-11-27T16:59:00+00:00:30",  # an offset with seconds: ISO 8601 only
            "yesterday",
        ]
    ),
    st.integers(),
)


def message(extra: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "tenant_id": names,
            "device_id": names,
            "provision_token": st.one_of(st.just("pdt_x"), st.just(""), st.none(), st.integers()),
            "metrics": st.dictionaries(names, values, max_size=4),
        },
        optional={"ts": times, "seq": st.one_of(st.integers(), st.text(max_size=3)), **extra},
    ).map(lambda m: {k: v for k, v in m.items() if v is not None or k == "metrics"})


def dumps(value: object) -> bytes:
    return json.dumps(value).encode()


@settings(max_examples=400, deadline=None)
@given(st.lists(message(extra={"bogus": st.integers()}), min_size=1, max_size=6))
def test_a_batch_taken_fast_is_taken_the_same_when_checked(messages: list[dict[str, Any]]) -> None:
    body = dumps({"messages": messages})
    quick = fast.batch(body, NOW)
    checked = intake.checked_batch(body, NOW)
    if quick is not None:
        assert quick == checked


@settings(max_examples=300, deadline=None)
@given(
    names,
    names,
    st.fixed_dictionaries(
        {"metrics": st.dictionaries(names, values, max_size=4)},
        optional={"ts": times, "seq": st.integers(), "other": st.integers()},
    ),
)
def test_a_reading_taken_fast_is_taken_the_same_when_checked(
    tenant: str, device: str, body: dict[str, Any]
) -> None:
    raw = dumps(body)
    quick = fast.reading(tenant, device, "pdt_x", raw, NOW)
    if quick is not None:
        assert quick == intake.checked_reading(tenant, device, "pdt_x", raw, NOW)


def test_a_valid_batch_is_taken_fast() -> None:
    body = dumps(
        {
            "messages": [
                {"tenant_id": "t1", "device_id": "d1", "provision_token": "p", "metrics": {"a": 1}},
                {
                    "tenant_id": "t1",
                    "device_id": "d2",
                    "provision_token": "p",
                    "metrics": {"b": 1.5, "c": True},
                    "ts": "2026-11-27T16:00:00+01:00",
                    "seq": 7,
                },
            ]
        }
    )
    assert fast.batch(body, NOW) == [
        Submission("t1", "d1", "p", Reading(NOW, {"a": 1}, None)),
        Submission("t1", "d2", "p", Reading(NOW - timedelta(hours=2), {"b": 1.5, "c": True}, 7)),
    ]
    assert intake.batch(body, NOW) == fast.batch(body, NOW)


def test_anything_wrong_goes_the_checked_way() -> None:
    good = {"tenant_id": "t1", "device_id": "d1", "provision_token": "p", "metrics": {"a": 1}}
    for bad in (
        {"metrics": {"bad name": 1}},
        {"metrics": {}},
        {"metrics": {"a": 2**70}},
        {"ts": "2026-11-27T18:00:00Z"},
        {"ts": "0001-01-01T00:00:00+14:00"},
        {"provision_token": ""},
        {"extra": 1},
    ):
        assert fast.batch(dumps({"messages": [good, good | bad]}), NOW) is None, bad


@settings(max_examples=400, deadline=None)
@given(st.lists(message(extra={"bogus": st.integers()}), min_size=1, max_size=12))
def test_a_batch_is_answered_as_the_checked_path_answers_it(
    messages: list[dict[str, Any]],
) -> None:
    """Whatever mix of valid and invalid messages: the same answers, message for message,
    in the same order, as when every message is checked field by field."""
    body = dumps({"messages": messages})
    assert intake.batch(body, NOW) == intake.checked_batch(body, NOW)


GOOD = {"tenant_id": "t1", "device_id": "d1", "provision_token": "p", "metrics": {"a": 1}}


def test_only_the_messages_the_fast_path_refuses_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One invalid message sent its 999 neighbours the checked way too, four times the
    CPU of the fast path, for anyone (security audit, M1)."""
    checked: list[object] = []
    check = intake._message

    def counted(message: object, received_at: datetime) -> object:
        checked.append(message)
        return check(message, received_at)

    batch = [GOOD | {"device_id": f"d{i}"} for i in range(1000)]
    batch[500] = GOOD | {"metrics": {"a": "x"}}
    batch[999] = GOOD | {"ts": "yesterday"}
    body = dumps({"messages": batch})
    expected = intake.checked_batch(body, NOW)
    monkeypatch.setattr(intake, "_message", counted)
    assert intake.batch(body, NOW) == expected
    assert checked == [batch[500], batch[999]]


@pytest.mark.parametrize(
    "body",
    [
        # A batch of nothing but invalid messages: after a few, the rest are checked
        # without a fast attempt first.
        dumps({"messages": [GOOD | {"metrics": {}}] * 20 + [GOOD] * 5}),
        dumps({"messages": [GOOD, GOOD | {"metrics": {}}] * 20}),
        # The envelope: each parser takes a key given twice at its last value.
        b'{"messages": [{"tenant_id": "t1"}], "messages": ' + dumps([GOOD, 5]) + b"}",
        b'{"messages": [' + dumps(GOOD) + b', {"metrics": {"a": 1e400}}]}',
        b'{"messages": [' + dumps(GOOD) + b', "\\ud800"]}',
        dumps({"messages": [GOOD, [GOOD]]}),
        dumps({"messages": [GOOD] * 1001}),
        dumps({"messages": [GOOD, GOOD | {"metrics": {}}], "more": 1}),
        dumps({"messages": []}),
    ],
)
def test_envelopes_and_mixes_are_answered_as_checked(body: bytes) -> None:
    assert intake.batch(body, NOW) == intake.checked_batch(body, NOW)
