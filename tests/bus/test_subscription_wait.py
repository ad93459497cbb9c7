"""Subscription.wait and cancellation (the WebSocket handlers cancel a waiting stream)."""

from __future__ import annotations

import asyncio

import pytest

from pulse.bus.events import TelemetryEvent
from pulse.bus.subscription import Closing, Filters, Lagging, Subscription


@pytest.mark.parametrize("steps", [0, 1, 2, 3])
async def test_a_cancel_that_arrives_as_the_wait_ends_is_not_lost(steps: int) -> None:
    """Whenever the cancel lands between the wake and the return, it is honoured."""
    subscription = Subscription("t1", Filters(), kind="test", limit=10, signals=frozenset({"s"}))
    waiting = asyncio.create_task(subscription.wait(100))
    await asyncio.sleep(0)
    subscription.notify("s")
    for _ in range(steps):
        await asyncio.sleep(0)
    if waiting.done():
        assert waiting.result() is True
        return
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiting, 5)


async def test_wait_reports_wake_and_timeout() -> None:
    subscription = Subscription("t1", Filters(), kind="test", limit=10, signals=frozenset({"s"}))
    assert await subscription.wait(0.01) is False
    subscription.notify("s")
    assert await subscription.wait(0.01) is True


def events(first: int, count: int) -> list[TelemetryEvent]:
    return [
        TelemetryEvent(i, "d1", "2026-11-27T17:00:00.000Z", '{"a": 1}')
        for i in range(first, first + count)
    ]


async def test_taking_signals_does_not_hide_lagging_or_closing() -> None:
    """A stream that takes events, writes them (slowly), then takes signals must still
    be woken for the lagging that happened meanwhile."""
    subscription = Subscription("t1", Filters(), kind="test", limit=3, signals=frozenset({"s"}))
    subscription.offer(events(1, 2))
    assert len(subscription.take()) == 2
    subscription.offer(events(3, 3))  # while the stream was writing: a whole queue
    subscription.offer(events(6, 1))  # and more: behind
    assert subscription.lagging
    subscription.take_signals()
    assert await subscription.wait(0.01) is True
    with pytest.raises(Lagging):
        subscription.take()

    closing = Subscription("t1", Filters(), kind="test", limit=3, signals=frozenset({"s"}))
    closing.close()
    closing.take_signals()
    assert await closing.wait(0.01) is True
    with pytest.raises(Closing):
        closing.take()


async def test_events_that_arrive_as_the_timeout_fires_are_reported() -> None:
    """The timeout has fired but the waiting task has not run yet when events come in:
    wait reports them, so the stream does not announce an idle position past them."""
    subscription = Subscription("t1", Filters(), kind="test", limit=10)
    waiting = asyncio.create_task(subscription.wait(0.05))
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 0.05
    # Block the loop past the deadline, so the timeout fires before the task resumes...
    while loop.time() < deadline + 0.01:
        pass
    await asyncio.sleep(0)  # ...the timeout's callback runs and cancels the wait
    subscription.offer(events(1, 2))  # then, before the task resumes, events arrive
    assert await waiting is True
    assert subscription.position == 2 and len(subscription.take()) == 2
