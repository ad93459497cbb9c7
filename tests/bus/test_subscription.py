"""The subscription queue alone, fed by an in-memory event source."""

from __future__ import annotations

import pytest

from pulse.bus.events import TelemetryEvent
from pulse.bus.subscription import Filters, Lagging, Subscription


def event(id: int, device: str = "d1", **metrics: float) -> TelemetryEvent:
    import orjson

    return TelemetryEvent(id, device, "2026-11-27T17:00:00.000Z", orjson.dumps(metrics).decode())


def sub(filters: Filters | None = None, limit: int = 10) -> Subscription:
    return Subscription("t1", filters or Filters(), kind="test", limit=limit)


def test_delivers_in_order_once() -> None:
    s = sub()
    s.offer([event(1, temp=1), event(2, temp=2)])
    s.offer([event(2, temp=2), event(3, temp=3)])
    assert [e.id for e in s.take()] == [1, 2, 3]
    assert s.position == 3


def test_device_and_metric_filters_advance_position() -> None:
    s = sub(Filters(device_ids=frozenset({"d2"}), metrics=frozenset({"hum"})))
    s.offer([event(1, "d1", hum=1), event(2, "d2", temp=1), event(3, "d2", hum=5, temp=2)])
    taken = s.take()
    assert [e.id for e in taken] == [3]
    assert s.position == 3
    assert taken[0].as_dict(frozenset({"hum"})) == {
        "type": "telemetry",
        "id": 3,
        "device_id": "d2",
        "data": {"time": "2026-11-27T17:00:00.000Z", "metrics": {"hum": 5}},
    }


def test_full_queue_marks_lagging_and_frees_memory() -> None:
    s = sub(limit=3)
    s.offer([event(i, temp=i) for i in range(1, 3)])
    s.offer([event(3, temp=3)])
    assert not s.lagging  # a whole queue waits, nothing more came yet
    s.offer([event(4, temp=4)])
    assert s.lagging
    assert s.pending() == 0
    with pytest.raises(Lagging):
        s.take()
    assert s.offer([event(20, temp=1)]) == (0, False)


def test_skip_through_drops_replayed_events() -> None:
    s = sub()
    s.offer([event(5), event(6), event(7)])
    s.skip_through(6)
    s.offer([event(6), event(8)])
    assert [e.id for e in s.take()] == [7, 8]


def test_new_filters_apply_to_the_queue() -> None:
    s = sub()
    s.offer([event(1, "a"), event(2, "b"), event(3, "a")])
    s.set_filters(Filters(device_ids=frozenset({"b"})))
    assert [e.id for e in s.take()] == [2]
    s.set_filters(Filters(device_ids=frozenset()))
    s.offer([event(4, "b")])
    assert s.take() == []
    assert s.position == 4


def test_signals_only_when_asked_for() -> None:
    s = Subscription("t1", Filters(), kind="v2", limit=5, signals=frozenset({"alerts"}))
    s.notify("devices")
    s.notify("alerts")
    s.notify("alerts")
    assert s.take_signals() == {"alerts"}
    assert s.take_signals() == set()


async def test_wait_times_out_then_wakes() -> None:
    s = sub()
    assert not await s.wait(0.01)
    s.offer([event(1)])
    assert await s.wait(0.01)


def test_encoding_is_shared_and_filtered() -> None:
    e = event(9, "dev-1", temp=21.5, hum=40)
    assert e.encode() is e.encode()
    assert e.encode(frozenset({"none"})) is None
    assert e.as_dict()["data"]["metrics"] == {"temp": 21.5, "hum": 40}


def test_one_offer_larger_than_the_queue_is_taken_whole_by_a_subscriber_not_behind() -> None:
    """A commit of more events than PULSE_QUEUE_SIZE cut every subscriber of the tenant,
    idle ones included (the protocol audit: one batch of 60 with a queue of 50)."""
    s = sub(limit=3)
    assert s.offer([event(i) for i in range(1, 10)]) == (9, False)
    assert not s.lagging
    assert [e.id for e in s.take()] == list(range(1, 10))
    s.offer([event(i) for i in range(10, 20)])  # taken whole again: nothing waited
    s.offer([event(20)])  # ten wait, more than a queue: behind
    assert s.lagging
    assert s.pending() == 0
