"""The v2 protocol Session alone: no sockets, no database, time passed in."""

from __future__ import annotations

import json

import pytest

from pulse.streams.legacy_v2.protocol import (
    DEVICE_ID_REQUIRED,
    DEVICE_ID_REQUIRED_TO_UNSUBSCRIBE,
    TENANT_REQUIRED,
    KeepAlive,
    PushAlerts,
    PushFleetSummary,
    Reply,
    Session,
)


def session(tenant_id: str | None = "t1", *, keepalive_s: float = 10.0) -> Session:
    return Session(tenant_id, keepalive_s=keepalive_s, max_devices=3)


def send(s: Session, message: object, now: float = 0.0) -> list[object]:
    return list(s.receive(json.dumps(message), now))


def error(sentence: str) -> list[object]:
    return [Reply({"type": "error", "message": sentence})]


def test_device_subscriptions() -> None:
    s = session()
    assert send(s, {"action": "subscribe", "type": "device", "device_id": "dev-0001"}) == [
        Reply({"type": "subscribed", "channel": "device", "device_id": "dev-0001"})
    ]
    assert s.devices == {"dev-0001"}
    assert send(s, {"action": "subscribe", "type": "device"}) == error(DEVICE_ID_REQUIRED)
    assert send(s, {"action": "subscribe", "type": "device", "device_id": ""}) == error(
        DEVICE_ID_REQUIRED
    )
    assert send(s, {"action": "unsubscribe", "type": "device"}) == error(
        DEVICE_ID_REQUIRED_TO_UNSUBSCRIBE
    )
    assert send(s, {"action": "unsubscribe", "type": "device", "device_id": "dev-0001"}) == [
        Reply({"type": "unsubscribed", "channel": "device", "device_id": "dev-0001"})
    ]
    assert s.devices == frozenset()  # none, not all


def test_at_most_max_devices() -> None:
    s = session()
    for device in ("a", "b", "c", "c"):
        assert send(s, {"action": "subscribe", "type": "device", "device_id": device})[0]
    (reply,) = send(s, {"action": "subscribe", "type": "device", "device_id": "d"})
    assert isinstance(reply, Reply) and reply.message["type"] == "error"
    assert s.devices == {"a", "b", "c"}


def test_alerts_and_fleet_push_a_snapshot_on_subscribe() -> None:
    s = session()
    assert send(s, {"action": "subscribe", "type": "alerts"}) == [
        Reply({"type": "subscribed", "channel": "alerts"}),
        PushAlerts(),
    ]
    assert send(s, {"action": "subscribe", "type": "fleet"}) == [
        Reply({"type": "subscribed", "channel": "fleet"}),
        PushFleetSummary(),
    ]
    assert send(s, {"action": "unsubscribe", "type": "alerts"}) == [
        Reply({"type": "unsubscribed", "channel": "alerts"})
    ]
    assert s.signals({"alerts"}) == []


@pytest.mark.parametrize(
    "frame",
    [
        "nope",
        "[1]",
        "null",
        '{"type": "fleet"}',
        '{"action": "ping"}',
        '{"action": "subscribe"}',
        '{"action": "subscribe", "type": "weather"}',
        '{"action": "subscribe", "type": ["fleet"]}',
        '{"action": "subscribe", "type": "device", "device_id": 1}',
        '{"action": "subscribe", "type": "device", "device_id": "' + "x" * 65 + '"}',
        b'{"action": "subscribe", "type": "fleet"}',
    ],
)
def test_anything_else_is_one_error(frame: str | bytes) -> None:
    s = session()
    (reply,) = s.receive(frame, 0.0)
    assert isinstance(reply, Reply)
    assert set(reply.message) == {"type", "message"} and reply.message["type"] == "error"
    assert len(reply.message["message"]) < 200
    assert not (s.devices or s.alerts or s.fleet)


def test_operators_placeholder_context_has_no_devices() -> None:
    s = session(None)
    assert send(s, {"action": "subscribe", "type": "device", "device_id": "d1"}) == error(
        TENANT_REQUIRED
    )
    assert send(s, {"action": "subscribe", "type": "fleet"})[1] == PushFleetSummary()


def test_alert_changes_push_the_alerts() -> None:
    s = session()
    send(s, {"action": "subscribe", "type": "alerts"})
    assert s.signals({"alerts"}) == [PushAlerts()]
    assert s.signals({"devices"}) == []
    assert s.due(9.9) == []  # no fleet subscription: the keepalive's schedule only
    assert s.next_due() == 10.0


def test_the_periodic_summary_keeps_its_schedule() -> None:
    s = session(keepalive_s=10.0)
    send(s, {"action": "subscribe", "type": "fleet"}, now=100.0)
    assert s.next_due() == 110.0
    assert s.due(109.9) == []
    assert s.due(110.0) == [PushFleetSummary(only_if_changed=False)]
    assert s.next_due() == 120.0
    # Late by 25 s: one summary, and the schedule skips what it missed.
    assert s.due(145.0) == [PushFleetSummary(only_if_changed=False)]
    assert s.next_due() == 150.0


def test_changes_push_a_summary_at_most_once_a_second() -> None:
    s = session(keepalive_s=10.0)
    send(s, {"action": "subscribe", "type": "fleet"}, now=0.0)
    assert s.signals({"devices"}) == []
    assert s.next_due() <= 0.0  # due at once: no change was pushed in the last second
    assert s.due(0.2) == [PushFleetSummary(only_if_changed=True)]
    s.signals({"alerts"})
    assert s.next_due() == pytest.approx(1.2)
    assert s.due(0.7) == []
    s.signals({"devices"})  # coalesced with the pending one
    assert s.due(1.2) == [PushFleetSummary(only_if_changed=True)]
    assert s.due(1.3) == []
    assert s.next_due() == 10.0
    # A change due together with the periodic summary: one summary, always sent.
    s.signals({"devices"})
    assert s.due(10.0) == [PushFleetSummary(only_if_changed=False)]
    send(s, {"action": "unsubscribe", "type": "fleet"}, now=10.5)
    s.signals({"devices"})
    assert s.next_due() == 20.0
    assert s.due(20.0) == [KeepAlive()]  # no summary: a ping frame keeps it alive


def test_every_connection_without_fleet_gets_a_keepalive_on_schedule() -> None:
    """The periodic summary was the only periodic message: a connection subscribed to a
    device or to alerts on a quiet tenant was silent until a proxy cut it."""
    s = Session("t1", keepalive_s=10.0, max_devices=3, now=100.0)
    assert s.next_due() == 110.0  # from when the connection opened
    assert s.due(109.9) == []
    assert s.due(110.0) == [KeepAlive()]
    send(s, {"action": "subscribe", "type": "device", "device_id": "d1"}, now=111.0)
    send(s, {"action": "subscribe", "type": "alerts"}, now=112.0)
    assert s.next_due() == 120.0
    assert s.due(145.0) == [KeepAlive()]  # late: one, and the missed ones skipped
    assert s.next_due() == 150.0
    # A fleet subscription: its summary is the periodic message, in place of the ping.
    send(s, {"action": "subscribe", "type": "fleet"}, now=146.0)
    assert s.due(156.0) == [PushFleetSummary(only_if_changed=False)]
