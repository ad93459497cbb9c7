"""Request parts -> Submission or Rejected, without a database."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import pytest

from pulse.errors import INVALID_PAYLOAD
from pulse.ingest import intake, validation
from pulse.ingest.model import Rejected, Submission
from pulse.ingest.validation import Reading

NOW = datetime(2026, 11, 27, 17, 0, tzinfo=UTC)


def test_reading_from_the_device_url() -> None:
    item = intake.reading("t1", "d1", "pdt_x", b'{"metrics": {"v": 1}, "seq": 4}', NOW)
    assert item == Submission("t1", "d1", "pdt_x", Reading(NOW, {"v": 1}, 4))


def test_shape_is_judged_before_the_token() -> None:
    item = intake.reading("t1", "d1", None, b'{"metrics": {}}', NOW)
    assert isinstance(item, Rejected) and item.reason.code == "invalid_payload"
    item = intake.reading("t1", "d1", None, b'{"metrics": {"v": 1}}', NOW)
    assert isinstance(item, Rejected) and item.reason.code == "invalid_device_token"


def test_heartbeat() -> None:
    assert intake.heartbeat("t1", "d1", "pdt_x") == Submission("t1", "d1", "pdt_x", None)
    item = intake.heartbeat("t1", "d 1", "pdt_x")
    assert isinstance(item, Rejected) and item.reason.code == "invalid_payload"
    item = intake.heartbeat("t1", "d1", "")
    assert isinstance(item, Rejected) and item.reason.code == "invalid_device_token"


def test_batch_messages_are_judged_one_by_one() -> None:
    body = orjson.dumps(
        {
            "messages": [
                {"tenant_id": "t1", "device_id": "d1", "provision_token": "p", "metrics": {"a": 1}},
                {"device_id": "d1", "provision_token": "p", "metrics": {"a": 1}},
                {"tenant_id": "t1", "device_id": 5, "provision_token": "p", "metrics": {"a": 1}},
                {"tenant_id": "t1", "device_id": "d1", "provision_token": 5, "metrics": {"a": 1}},
                {"tenant_id": "t1", "device_id": "d1", "metrics": {"a": 1}},
                None,
            ]
        }
    )
    items = intake.batch(body, NOW)
    assert isinstance(items, list)
    assert items[0] == Submission("t1", "d1", "p", Reading(NOW, {"a": 1}, None))
    reasons = [item.reason.code for item in items[1:] if isinstance(item, Rejected)]
    assert reasons == [
        "invalid_payload",
        "invalid_payload",
        "invalid_payload",
        "invalid_device_token",
        "invalid_payload",
    ]
    assert isinstance(items[4], Rejected) and items[4].detail == "provision_token is missing."


@pytest.mark.parametrize(
    "envelope",
    [
        [],
        {"messages": []},
        {"messages": "x"},
        {"messages": [{}] * 1001},
        {"messages": [{}], "x": 1},
    ],
)
def test_batch_envelope(envelope: object) -> None:
    item = intake.batch(orjson.dumps(envelope), NOW)
    assert isinstance(item, Rejected) and item.reason.code == "invalid_payload"


@pytest.mark.parametrize(
    ("field", "detail"),
    [
        ("tenant_id", "tenant_id '...' is invalid; ids are 1 to 64 characters"),
        ("device_id", "device_id '...' is invalid; ids are 1 to 64 characters"),
        ("provision_token", "provision_token must be a string."),
        ("ts", "ts must be an ISO-8601 string, not a number beyond the range of a double"),
        ("seq", "seq must be an integer, not a number beyond the range of a double"),
    ],
)
def test_a_number_beyond_a_double_is_named_in_any_field(field: str, detail: str) -> None:
    """What stands for such a number (a string, review MEDIUM-3) is read as the number
    by every check of a message, shown by none: not an id, not a token."""
    message = {
        "tenant_id": "t1",
        "device_id": "d1",
        "provision_token": "pdt_x",
        "metrics": {"v": 1},
    }
    poisoned = orjson.dumps({**message, field: 0}).replace(
        b'"' + field.encode() + b'":0', b'"' + field.encode() + b'":1e400'
    )
    body = b'{"messages": [' + poisoned + b", " + orjson.dumps(message) + b"]}"
    items = intake.batch(body, NOW)
    assert isinstance(items, list) and isinstance(items[1], Submission)
    assert isinstance(items[0], Rejected) and items[0].reason.code == "invalid_payload"
    assert items[0].detail.startswith(detail), items[0].detail


@pytest.mark.parametrize(
    ("wrong", "detail"),
    [
        (
            b'"bad name":1',
            "Metric name 'bad name' is invalid; names are 1 to 64 characters "
            "of letters, digits and _ . : -",
        ),
        (b'"zz":"x"', "Metric 'zz' must be a finite number or a boolean, not a string."),
        (
            b'"zz":1e400',
            "Metric 'zz' must be a finite number or a boolean, not a number beyond the "
            "range of a double (about 1.8e308 either side of zero).",
        ),
    ],
)
def test_a_refused_message_costs_no_python_check_per_metric(
    wrong: bytes, detail: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone could post 1000 messages of 120 good metrics and a wrong one: each message
    went the checked way, where each of its metrics took checks in Python, 121,000 of
    them, 0.35 s of the event loop per request (the security audit, H1). The first
    wrong metric is found in compiled code: the checks run in Python for a message do
    not grow with its metrics, and each message is still refused for that metric."""
    checks: list[object] = []

    def counted(check: Callable[[object], bool]) -> Callable[[object], bool]:
        def count(value: object) -> bool:
            checks.append(value)
            return check(value)

        return count

    monkeypatch.setattr(validation, "is_valid_name", counted(validation.is_valid_name))
    monkeypatch.setattr(validation, "is_metric_value", counted(validation.is_metric_value))

    def python_checks(good_metrics: int) -> int:
        good = orjson.dumps({f"m{i}": i for i in range(good_metrics)})
        message = b'{"tenant_id":"t","device_id":"d","provision_token":"p","metrics":'
        body = b'{"messages":[' + b",".join([message + good[:-1] + b"," + wrong + b"}}"] * 1000)
        checks.clear()
        items = intake.batch(body + b"]}", NOW)
        assert isinstance(items, list) and len(items) == 1000
        assert set(items) == {Rejected(INVALID_PAYLOAD, detail)}
        return len(checks)

    # Per message: the first metric's name and value, and the wrong one's name, to word it.
    assert python_checks(120) == python_checks(1) <= 3 * 1000
