"""The telemetry WebSocket's actions alone: filters and replies, no sockets."""

from __future__ import annotations

import pytest

from pulse.bus.events import TelemetryEvent
from pulse.bus.subscription import Filters
from pulse.streams.messages import BadMessage
from pulse.streams.telemetry_protocol import Reauthenticate, connected_message, handle_action

EVERYTHING = Filters()


def act(filters: Filters, message: dict[str, object]) -> tuple[Filters, dict[str, object]]:
    outcome = handle_action(filters, message, max_device_filters=3)
    assert not isinstance(outcome, Reauthenticate)
    return outcome


def test_subscribing_narrows_and_unsubscribing_the_last_leaves_none() -> None:
    filters, reply = act(EVERYTHING, {"action": "subscribe", "device_id": "d1"})
    assert filters == Filters(device_ids=frozenset({"d1"}))
    assert reply == {"type": "subscribed", "device_ids": ["d1"]}
    filters, reply = act(filters, {"action": "subscribe", "device_id": "d2", "device_ids": ["d3"]})
    assert filters.device_ids == {"d1", "d2", "d3"}
    assert reply == {"type": "subscribed", "device_ids": ["d2", "d3"]}
    filters, reply = act(filters, {"action": "unsubscribe", "device_ids": ["d1", "d2", "d3"]})
    assert filters.device_ids == frozenset()  # no device, not every device
    assert reply == {"type": "unsubscribed", "device_ids": ["d1", "d2", "d3"]}
    assert not filters.accepts(TelemetryEvent(1, "d1", "2026-11-27T17:00:00.000Z", '{"a": 1}'))


def test_metrics_and_clearing() -> None:
    filters, reply = act(EVERYTHING, {"action": "set_metrics", "metrics": ["t", "h", "t"]})
    assert filters.metrics == {"t", "h"} and reply == {
        "type": "metrics_updated",
        "metrics": ["t", "h"],
    }
    filters, reply = act(filters, {"action": "set_metrics", "metrics": []})
    assert filters.metrics is None and reply == {"type": "metrics_updated", "metrics": []}
    narrowed = Filters(device_ids=frozenset({"d1"}), metrics=frozenset({"t"}))
    assert act(narrowed, {"action": "clear_filters"}) == (EVERYTHING, {"type": "filters_cleared"})
    assert act(narrowed, {"action": "ping"}) == (narrowed, {"type": "pong"})


def test_auth_asks_for_a_verification() -> None:
    assert handle_action(
        EVERYTHING, {"action": "auth", "token": "x.y.z"}, max_device_filters=3
    ) == (Reauthenticate("x.y.z"))


@pytest.mark.parametrize(
    "message",
    [
        {},
        {"action": "dance"},
        {"action": ["ping"]},
        {"action": "subscribe"},
        {"action": "subscribe", "device_ids": []},
        {"action": "subscribe", "device_ids": {"d1": 1}},
        {"action": "subscribe", "device_id": 5},
        {"action": "subscribe", "device_ids": ["d1", "d2", "d3", "d4"]},
        {"action": "unsubscribe", "device_id": "d1"},
        {"action": "set_metrics", "metrics": "temp"},
        {"action": "set_metrics", "metrics": [None]},
        {"action": "auth", "token": ""},
        {"action": "auth", "token": 42},
    ],
)
def test_bad_messages(message: dict[str, object]) -> None:
    with pytest.raises(BadMessage) as caught:
        handle_action(EVERYTHING, message, max_device_filters=3)
    assert str(caught.value).endswith(".")


def test_connected_message() -> None:
    filters = Filters(device_ids=frozenset({"b", "a"}), metrics=None)
    assert connected_message("t1", filters, 41) == {
        "type": "connected",
        "tenant_id": "t1",
        "filters": {"device_ids": ["a", "b"], "metrics": []},
        "last_event_id": 41,
    }
