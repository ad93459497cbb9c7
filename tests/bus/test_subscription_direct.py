"""A subscription's sink: live events handed to a caught-up client from the hub's call.

The stream's task must not be woken for them, and nothing may be written while
the task has something of its own to send: queued events, signals, a lagging
or closing end.
"""

from __future__ import annotations

import asyncio

import pytest

from pulse.bus.events import TelemetryEvent
from pulse.bus.subscription import Filters, Lagging, Subscription


def events(*ids: int, device: str = "d1") -> list[TelemetryEvent]:
    return [TelemetryEvent(i, device, "2026-11-27T17:00:00.000Z", '{"a": 1}') for i in ids]


class Client:
    """A sink that records what it was given, and can refuse or fail."""

    def __init__(self) -> None:
        self.written: list[int] = []
        self.accepting = True
        self.failing = False
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1

    def write_now(self, batch: list[TelemetryEvent]) -> bool:
        if self.failing:
            raise OSError("the socket went away")
        if not self.accepting:
            return False
        self.written += [e.id for e in batch]
        return True


async def parked(subscription: Subscription) -> asyncio.Task[bool]:
    waiting = asyncio.create_task(subscription.wait(100))
    await asyncio.sleep(0)
    return waiting


def subscription(client: Client, **filters: frozenset[str]) -> Subscription:
    return Subscription(
        "t1", Filters(**filters), kind="test", limit=5, signals=frozenset({"s"}), sink=client
    )


async def test_a_parked_stream_gets_events_written_without_being_woken() -> None:
    client = Client()
    s = subscription(client)
    waiting = await parked(s)
    assert s.offer(events(1, 2)) == (2, True)
    assert s.offer(events(3)) == (1, True)
    await asyncio.sleep(0.01)
    assert client.written == [1, 2, 3]
    assert not waiting.done()  # the task was never woken
    assert s.pending() == 0 and s.position == 3
    waiting.cancel()


async def test_filters_apply_before_the_direct_write() -> None:
    client = Client()
    s = subscription(client, device_ids=frozenset({"d2"}))
    waiting = await parked(s)
    s.offer(events(1, 2) + events(3, device="d2"))
    assert client.written == [3] and s.position == 3
    waiting.cancel()


async def test_a_stream_that_is_not_waiting_gets_its_events_queued() -> None:
    client = Client()
    s = subscription(client)
    assert s.offer(events(1)) == (1, False)  # no task parked
    assert client.written == [] and [e.id for e in s.take()] == [1]


async def test_a_refused_write_queues_the_events_and_wakes_the_stream() -> None:
    client = Client()
    client.accepting = False  # the client has not read what came before
    s = subscription(client)
    waiting = await parked(s)
    assert s.offer(events(1, 2)) == (2, False)
    assert await asyncio.wait_for(waiting, 1) is True
    assert [e.id for e in s.take()] == [1, 2] and client.written == []


async def test_a_failing_write_queues_the_events() -> None:
    client = Client()
    client.failing = True
    s = subscription(client)
    waiting = await parked(s)
    s.offer(events(1))
    assert await asyncio.wait_for(waiting, 1) is True
    assert [e.id for e in s.take()] == [1]


async def test_nothing_is_written_past_what_the_stream_has_queued() -> None:
    """Queued events go first: while anything is queued, later events queue behind it."""
    client = Client()
    client.accepting = False
    s = subscription(client)
    waiting = await parked(s)
    s.offer(events(1))  # refused: queued, the task is woken but has not run yet
    client.accepting = True
    s.offer(events(2))
    assert client.written == []
    await waiting
    assert [e.id for e in s.take()] == [1, 2]


async def test_a_pending_signal_keeps_events_on_the_task_path() -> None:
    client = Client()
    s = subscription(client)
    waiting = await parked(s)
    s.notify("s")  # woken, not yet run
    s.offer(events(1))
    assert client.written == []
    await waiting
    assert [e.id for e in s.take()] == [1] and s.take_signals() == {"s"}


async def test_the_lagging_end_is_never_bypassed() -> None:
    client = Client()
    client.accepting = False
    s = subscription(client)
    waiting = await parked(s)
    s.offer(events(1, 2, 3, 4, 5))  # the client takes nothing: a whole queue waits
    s.offer(events(6))  # behind
    assert s.lagging
    client.accepting = True
    assert s.offer(events(7)) == (0, False) and client.written == []
    await waiting
    with pytest.raises(Lagging):
        s.take()


async def test_after_a_timeout_the_stream_resumes_past_what_was_written() -> None:
    client = Client()
    s = subscription(client)
    assert await s.wait(0.01) is False  # parks, times out, unparks
    s.offer(events(1))  # not parked now: queued
    assert client.written == [] and [e.id for e in s.take()] == [1]
    waiting = await parked(s)
    s.offer(events(2))
    assert client.written == [2] and s.position == 2
    waiting.cancel()
