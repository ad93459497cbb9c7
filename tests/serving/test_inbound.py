"""InboundQueue: hypercorn's and Quart's queues between a WebSocket's socket and its handler."""

from __future__ import annotations

import asyncio

import pytest

from pulse.serving.inbound import InboundQueue


async def test_first_in_first_out() -> None:
    queue: InboundQueue[int] = InboundQueue(10)
    for i in range(5):
        await queue.put(i)
    assert [await queue.get() for _ in range(5)] == [0, 1, 2, 3, 4]
    assert queue.qsize() == 0


async def test_a_full_queue_holds_the_sender_back_until_the_handler_reads() -> None:
    queue: InboundQueue[int] = InboundQueue(2)
    await queue.put(1)
    await queue.put(2)
    third = asyncio.create_task(queue.put(3))
    await asyncio.sleep(0.01)
    assert not third.done() and queue.qsize() == 2  # held back: nothing piles up
    assert await queue.get() == 1
    await asyncio.wait_for(third, 1)
    assert [await queue.get(), await queue.get()] == [2, 3]


async def test_once_nobody_reads_a_waiting_sender_returns_and_more_is_dropped() -> None:
    """The app has ended (a client cut for not reading its replies): hypercorn's reader,
    waiting for room, and the disconnect it queues as it ends the app, must not wait for
    ever (the socket was never read again)."""
    queue: InboundQueue[int] = InboundQueue(1)
    await queue.put(1)
    waiting = asyncio.create_task(queue.put(2))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    queue.close()
    await asyncio.wait_for(waiting, 1)
    await asyncio.wait_for(queue.put(3), 1)
    assert queue.qsize() == 0


async def test_a_waiting_handler_gets_what_arrives() -> None:
    queue: InboundQueue[str] = InboundQueue(2)
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    await queue.put("hello")
    assert await asyncio.wait_for(getter, 1) == "hello"


async def test_a_cancelled_waiter_does_not_swallow_an_item() -> None:
    """Two getters; the one woken is cancelled before it runs: the other gets the item."""
    queue: InboundQueue[int] = InboundQueue(2)
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    await queue.put(7)  # wakes `first`...
    first.cancel()  # ...which is cancelled before it takes the item
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 1) == 7


async def test_a_cancelled_sender_leaves_no_item_and_no_waiter() -> None:
    queue: InboundQueue[int] = InboundQueue(1)
    await queue.put(1)
    blocked = asyncio.create_task(queue.put(2))
    await asyncio.sleep(0)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert await queue.get() == 1 and queue.qsize() == 0
    await asyncio.wait_for(queue.put(3), 1)  # room again, no stale waiter in the way
    assert await queue.get() == 3


async def test_a_watcher_sees_what_was_queued_then_what_comes_until_it_stops() -> None:
    queue: InboundQueue[str] = InboundQueue(10)
    await queue.put("request")
    seen: list[str] = []
    queue.watch(seen.append)
    assert seen == ["request"]  # what arrived before it watched, first
    await queue.put("disconnect")
    assert seen == ["request", "disconnect"]
    queue.watch(None)
    await queue.put("later")
    assert seen == ["request", "disconnect"]
    assert [await queue.get() for _ in range(3)] == ["request", "disconnect", "later"]
