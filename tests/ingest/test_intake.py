"""Request parts -> Submission or Rejected, without a database."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from pulse.ingest import intake
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
