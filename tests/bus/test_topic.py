"""Topic.close: a tenant's fetcher never outlives its topic.

With stand-ins for the store and the listener whose calls swallow a
cancellation, as Python 3.11's wait_for (used inside asyncpg too) can when the
cancellation arrives as the call completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import types
from typing import Any

from pulse.bus.hub import Hub, Topic
from pulse.ops.metrics import Metrics


class SwallowingStore:
    def __init__(self) -> None:
        self.inside = asyncio.Event()

    async def channel_for(self, tenant_id: str) -> str:
        return "pulse_t1"

    async def newest_id(self, tenant_id: str) -> int:
        self.inside.set()
        with contextlib.suppress(asyncio.CancelledError):  # lost, as wait_for may lose it
            await asyncio.sleep(0.05)
        return 5


class Listener:
    def __init__(self, unlisten_s: float = 0.0) -> None:
        self.channels: set[str] = set()
        self.unlisten_s = unlisten_s

    async def listen(self, channel: str) -> None:
        self.channels.add(channel)

    async def unlisten(self, channel: str) -> None:
        await asyncio.sleep(self.unlisten_s)  # a round trip to the database
        self.channels.discard(channel)


class Store:
    async def channel_for(self, tenant_id: str) -> str:
        return "pulse_t1"

    async def newest_id(self, tenant_id: str) -> int:
        return 5


def fetchers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "pulse:fetch:t1" and not t.done()]


async def test_a_topic_closed_while_opening_leaves_no_fetcher() -> None:
    store, listener = SwallowingStore(), Listener()
    hub = types.SimpleNamespace(store=store, listener=listener, _closing={})
    topic = Topic(hub, "t1")  # type: ignore[arg-type]
    await store.inside.wait()  # opening: reading the newest id
    await topic.close()
    await asyncio.sleep(0.1)  # whatever the opening would still do, it has done
    assert fetchers() == []
    assert listener.channels == set()


async def test_a_topic_closed_when_open_stops_its_fetcher() -> None:
    store, listener = SwallowingStore(), Listener()
    hub = types.SimpleNamespace(store=store, listener=listener, _closing={})
    topic = Topic(hub, "t1")  # type: ignore[arg-type]
    await topic.opened
    assert len(fetchers()) == 1 and listener.channels == {"pulse_t1"}
    await topic.close()
    assert fetchers() == [] and listener.channels == set()


async def test_a_tenant_resubscribed_while_its_topic_closes_stays_listened_to() -> None:
    """The last subscriber leaves and another arrives while the UNLISTEN is on its way:
    the new topic's LISTEN must come after it, or the tenant gets no more events."""
    listener = Listener(unlisten_s=0.05)
    hub = Hub(Store(), "postgresql://unused", Metrics(), queue_size=10)  # type: ignore[arg-type]
    hub.listener = listener  # type: ignore[assignment]
    inside = asyncio.Event()

    async def leave_at_once() -> None:
        async with hub.subscribe("t1", kind="test"):
            inside.set()

    leaving = asyncio.create_task(leave_at_once())
    await inside.wait()
    await asyncio.sleep(0.01)  # the topic is closing: its UNLISTEN is in flight
    async with hub.subscribe("t1", kind="test"):
        await leaving
        await asyncio.sleep(0.1)
        assert listener.channels == {"pulse_t1"}
    await hub.close()
