"""The hub on an in-memory event source: delivery, watching, and topics that never leak.

Unit tests: the hub's event source and table are the in-memory stand-ins of
tests/bus/memory.py (the same hub runs on LISTEN and PostgreSQL everywhere
else in the suite).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

import pytest

from pulse.bus import hub as hub_module
from pulse.bus.events import TelemetryEvent
from pulse.bus.hub import Hub
from pulse.bus.subscription import Subscription
from pulse.db.errors import DatabaseUnavailable
from pulse.ops.metrics import Metrics
from tests.bus.memory import MemorySource, MemoryStore, running_hub
from tests.support import until


def topic_tasks() -> list[asyncio.Task[Any]]:
    return [
        t for t in asyncio.all_tasks() if t.get_name().startswith("pulse:topic:") and not t.done()
    ]


async def received(subscription: Subscription, count: int) -> list[int]:
    ids: list[int] = []
    async with asyncio.timeout(5):
        while len(ids) < count:
            await subscription.wait(None)
            ids += [e.id for e in subscription.take()]
    return ids


async def test_committed_events_reach_every_subscriber_once_in_order() -> None:
    async with (
        running_hub() as (hub, source, store),
        hub.subscribe("t1", kind="test") as a,
        hub.subscribe("t1", kind="test") as b,
    ):
        assert source.watching == {"t1"}
        for _ in range(3):
            source.committed("t1", store.commit("t1", count=2))
        source.committed("t1", 6)  # a repeated wake-up costs nothing
        assert await received(a, 6) == [1, 2, 3, 4, 5, 6]
        assert await received(b, 6) == [1, 2, 3, 4, 5, 6]


async def test_a_lost_wakeup_is_made_good_by_a_resync() -> None:
    async with (
        running_hub() as (hub, _source, store),
        hub.subscribe("t1", kind="test") as subscription,
    ):
        store.commit("t1", count=2)  # committed, but the wake-up is lost
        hub.resync()  # what a source does after a reconnect
        assert await received(subscription, 2) == [1, 2]


async def test_a_subscriber_starts_after_what_was_committed_before() -> None:
    async with running_hub() as (hub, source, store):
        store.commit("t1", count=3)
        async with hub.subscribe("t1", kind="test") as subscription:
            assert subscription.position == 3
            source.committed("t1", store.commit("t1"))
            assert await received(subscription, 1) == [4]


async def test_tenants_are_watched_while_subscribed_and_kept_apart() -> None:
    async with running_hub() as (hub, source, store):
        async with hub.subscribe("t1", kind="test") as t1:
            async with hub.subscribe("t2", kind="test") as t2:
                assert source.watching == {"t1", "t2"}
                source.committed("t2", store.commit("t2", count=2))
                assert await received(t2, 2) == [1, 2]
                assert t1.pending() == 0
            await until(lambda: source.watching == {"t1"})
        await until(lambda: source.watching == set())
        assert topic_tasks() == []


async def test_a_tenant_resubscribed_while_its_topic_closes_stays_watched() -> None:
    """The last subscriber leaves and another arrives while the unwatch is in flight:
    the new topic's watch must come after it, or the tenant gets no more events."""
    async with running_hub() as (hub, source, store):
        source.unwatch_gate.clear()
        leaving = asyncio.create_task(_subscribe_and_leave(hub))
        await until(lambda: ("unwatch", "t1") in source.calls)
        coming = asyncio.create_task(_subscribe_and_take(hub, store, source))
        await asyncio.sleep(0)  # give it every chance to watch too early
        assert source.calls == [("watch", "t1"), ("unwatch", "t1")]
        source.unwatch_gate.set()
        await leaving
        assert await asyncio.wait_for(coming, 5) == [1]
        assert source.calls == [
            ("watch", "t1"),
            ("unwatch", "t1"),
            ("watch", "t1"),
            ("unwatch", "t1"),
        ]


async def _subscribe_and_leave(hub: Hub) -> None:
    async with hub.subscribe("t1", kind="test"):
        pass


async def _subscribe_and_take(hub: Hub, store: MemoryStore, source: MemorySource) -> list[int]:
    async with hub.subscribe("t1", kind="test") as subscription:
        source.committed("t1", store.commit("t1"))
        return await received(subscription, 1)


async def test_a_subscriber_that_leaves_while_its_topic_opens_leaves_nothing_behind() -> None:
    async with running_hub() as (hub, source, _):
        source.watch_gate.clear()
        subscriber = asyncio.create_task(_subscribe_and_leave(hub))
        await until(lambda: ("watch", "t1") in source.calls)
        subscriber.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await subscriber
        source.watch_gate.set()
        await until(lambda: topic_tasks() == [])
        await until(lambda: source.watching == set())


class SwallowingStore(MemoryStore):
    """A read that swallows the cancellation arriving while it runs, as Python 3.11's
    wait_for (used inside asyncpg too) can."""

    def __init__(self) -> None:
        super().__init__()
        self.inside = asyncio.Event()

    async def newest_id(self, tenant_id: str) -> int:
        self.inside.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
        return 0


async def test_a_topic_closed_while_a_read_swallows_its_cancellation_still_ends() -> None:
    source, store = MemorySource(), SwallowingStore()
    hub = Hub(store, source, Metrics(), queue_size=10)  # type: ignore[arg-type]
    subscriber = asyncio.create_task(_subscribe_and_leave(hub))
    await asyncio.wait_for(store.inside.wait(), 5)
    await asyncio.wait_for(hub.close(), 5)
    assert topic_tasks() == []
    assert source.watching == set()
    with pytest.raises(DatabaseUnavailable):
        await subscriber


async def test_churn_leaves_no_topic_task_and_no_watch() -> None:
    """Issue #19.4: a topic's task never outlives its topic, whatever the timing of
    subscribers coming, leaving and being cancelled around its opening and closing."""
    async with running_hub() as (hub, source, store):

        async def visit(tenant: str, cancel_after: int) -> None:
            async with hub.subscribe(tenant, kind="test"):
                for _ in range(cancel_after):
                    await asyncio.sleep(0)

        for round_ in range(30):
            tasks = [
                asyncio.create_task(visit(f"t{i % 3}", (i * 7 + round_) % 4)) for i in range(12)
            ]
            for i, task in enumerate(tasks):
                if (i + round_) % 3 == 0:
                    task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            source.committed("t0", store.commit("t0"))
        await until(lambda: topic_tasks() == [] and source.watching == set())
        assert hub.subscriber_count() == 0


async def test_closing_the_hub_waits_for_topics_on_their_way_out() -> None:
    source, store = MemorySource(), MemoryStore()
    hub = Hub(store, source, Metrics(), queue_size=10)  # type: ignore[arg-type]
    source.unwatch_gate.clear()
    leaving = asyncio.create_task(_subscribe_and_leave(hub))
    await until(lambda: ("unwatch", "t1") in source.calls)
    closing = asyncio.create_task(hub.close())
    await asyncio.sleep(0)
    assert not closing.done()  # still waiting for the unwatch
    source.unwatch_gate.set()
    await asyncio.wait_for(closing, 5)
    await leaving
    assert topic_tasks() == [] and source.watching == set()


class Sink:
    def __init__(self) -> None:
        self.aborted = asyncio.Event()

    def write_now(self, events: list[TelemetryEvent]) -> bool:
        return False

    def abort(self) -> None:
        self.aborted.set()


async def test_a_lagging_subscriber_is_aborted_by_its_sink_after_the_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub_module, "LAGGING_GRACE_S", 0.01)
    async with running_hub(queue_size=3) as (hub, source, store):
        sink = Sink()
        async with hub.subscribe("t1", kind="test", sink=sink) as subscription:
            source.committed("t1", store.commit("t1", count=3))
            await until(lambda: subscription.pending() == 3)  # a whole queue waits
            source.committed("t1", store.commit("t1", count=1))
            await asyncio.wait_for(sink.aborted.wait(), 5)
            assert subscription.lagging


async def test_events_for_a_lagging_subscriber_are_counted_as_dropped() -> None:
    """pulse_events_dropped_lagging_total (CONTRACT 6: /metrics, events dropped for lag):
    what comes for a subscriber cut as lagging, until its stream ends, from the rest of
    the batch that cut it on (that rest was not counted)."""

    def sample(name: str) -> float | None:
        return hub.metrics.registry.get_sample_value(name, {"kind": "test"})

    async with (
        running_hub(queue_size=3) as (hub, source, store),
        hub.subscribe("t1", kind="test") as subscription,
    ):
        source.committed("t1", store.commit("t1", count=3))
        await until(lambda: subscription.pending() == 3)
        source.committed("t1", store.commit("t1", count=2))
        await until(lambda: subscription.lagging)
        assert sample("pulse_lagging_disconnects_total") == 1
        # 3 queued (then dropped with the queue), the 4th and 5th never queued.
        assert sample("pulse_events_dropped_lagging_total") == 2
        source.committed("t1", store.commit("t1", count=4))
        await until(lambda: sample("pulse_events_dropped_lagging_total") == 6)


async def test_draining_ends_subscriptions_and_refuses_new_ones() -> None:
    async with running_hub() as (hub, _, _):
        async with hub.subscribe("t1", kind="test") as subscription:
            hub.drain()
            assert await subscription.wait(1)
            assert subscription.closing
        with pytest.raises(DatabaseUnavailable):
            async with hub.subscribe("t1", kind="test"):
                pass


# -- events handed over by the source (NATS): deliver -------------------------------------


async def test_delivered_events_are_published_without_reading_the_table() -> None:
    async with (
        running_hub() as (hub, source, store),
        hub.subscribe("t1", kind="test") as subscription,
    ):
        store.commit("t1", count=3)
        source.published("t1", 0, store.rows("t1", 1, 2))
        source.published("t1", 2, store.rows("t1", 3, 3))
        assert await received(subscription, 3) == [1, 2, 3]
        assert store.reads == 0
        assert hub.metrics.bus_gaps_filled._value.get() == 0


async def test_a_gap_is_filled_from_the_table_before_anything_after_it() -> None:
    async with (
        running_hub() as (hub, source, store),
        hub.subscribe("t1", kind="test") as subscription,
    ):
        store.commit("t1", count=5)
        source.published("t1", 0, store.rows("t1", 1, 2))
        assert await received(subscription, 2) == [1, 2]
        # The message with 3 was lost: 4 and 5 wait for it, read from the table.
        source.published("t1", 3, store.rows("t1", 4, 5))
        assert await received(subscription, 3) == [3, 4, 5]
        assert store.reads == 1
        assert hub.metrics.bus_gaps_filled._value.get() == 1


async def test_repeated_and_overlapping_messages_are_delivered_once() -> None:
    async with (
        running_hub() as (hub, source, store),
        hub.subscribe("t1", kind="test") as subscription,
    ):
        store.commit("t1", count=4)
        source.published("t1", 0, store.rows("t1", 1, 2))
        source.published("t1", 0, store.rows("t1", 1, 2))  # a second relay, or a repeat
        source.published("t1", 1, store.rows("t1", 2, 4))  # overlapping
        assert await received(subscription, 4) == [1, 2, 3, 4]
        await asyncio.sleep(0)
        assert subscription.pending() == 0 and store.reads == 0


async def test_messages_during_a_read_wait_for_it_and_keep_commit_order() -> None:
    async with (
        running_hub() as (hub, source, store),
        hub.subscribe("t1", kind="test") as subscription,
    ):
        store.commit("t1", count=6)
        store.read_gate.clear()
        source.published("t1", 2, store.rows("t1", 3, 3))  # a gap: the table is read...
        await until(lambda: store.reads == 1)
        # ...and while that read is in flight, messages go on coming.
        source.published("t1", 3, store.rows("t1", 4, 4))
        store.commit("t1", count=1)
        source.published("t1", 6, store.rows("t1", 7, 7))
        assert subscription.pending() == 0
        store.read_gate.set()
        assert await received(subscription, 7) == [1, 2, 3, 4, 5, 6, 7]
        assert store.reads == 1  # what came after the read followed it: no second read


async def test_messages_of_an_opening_topic_wait_for_its_newest_id() -> None:
    async with running_hub() as (hub, source, store):
        store.commit("t1", count=2)
        source.watch_gate.clear()  # the topic is opening
        opened = asyncio.Event()
        first = asyncio.create_task(_first_event(hub, opened))
        await until(lambda: ("watch", "t1") in source.calls)
        source.watching.add("t1")  # watched, not yet returned
        store.commit("t1", count=2)
        # Comes before the topic knows its newest id (4): it waits, then is dropped,
        # since the subscriber starts after what was committed before it.
        source.published("t1", 0, store.rows("t1", 1, 4))
        source.watch_gate.set()
        await opened.wait()
        source.published("t1", 4, store.rows("t1", 5, store.commit("t1")))
        assert await first == 5
        assert store.reads == 0


async def _first_event(hub: Hub, opened: asyncio.Event) -> int:
    async with hub.subscribe("t1", kind="test") as subscription:
        assert subscription.position == 4
        opened.set()
        return (await received(subscription, 1))[0]


class FailingStore(MemoryStore):
    """A table whose reads of new events fail (a database refusing connections)."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.failures = 0

    async def events_after(self, tenant_id: str, after: int, **kw: Any) -> list[TelemetryEvent]:
        if self.failing:
            self.failures += 1
            raise DatabaseUnavailable("sorry, too many clients already")
        return await super().events_after(tenant_id, after, **kw)


async def test_failing_reads_of_many_tenants_say_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From the operations audit: each tenant's failed read logged a line per try (7-9
    lines a second for one tenant while the database refused connections, more with
    more tenants). One line per 10 s for all of them now, saying how many were not said."""
    store = FailingStore()
    tenants = [f"t{i}" for i in range(5)]
    async with running_hub(store=store) as (hub, source, _), contextlib.AsyncExitStack() as subs:
        for tenant in tenants:
            await subs.enter_async_context(hub.subscribe(tenant, kind="test"))
        store.failing = True
        with caplog.at_level(logging.WARNING, logger="pulse.bus.hub"):
            for tenant in tenants:
                source.committed(tenant, store.commit(tenant))
            await until(lambda: store.failures >= 20)
        store.failing = False
    lines = [r for r in caplog.records if r.name == "pulse.bus.hub"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "too many clients" in lines[0].getMessage()


class RevokedStore(MemoryStore):
    """Reads fail as with SELECT revoked: not an outage, an error that lasts."""

    def __init__(self) -> None:
        super().__init__()
        self.failing = False
        self.tries: list[float] = []

    async def events_after(self, tenant_id: str, after: int, **kw: Any) -> list[TelemetryEvent]:
        if self.failing:
            self.tries.append(time.monotonic())
            raise PermissionError("permission denied for table telemetry")
        return await super().events_after(tenant_id, after, **kw)


async def test_a_read_failing_for_good_backs_off_is_counted_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From the operations audit: a read failing for a reason that lasts was tried every
    second, each with a 28-line traceback, and nothing else told of it. Now the tries
    back off (0.1 s doubling to 5 s), each is counted, the traceback is logged once, and
    the hub says why its streams get nothing until a read succeeds."""
    store = RevokedStore()
    async with (
        running_hub(store=store) as (hub, source, _),
        hub.subscribe("t1", kind="test") as subscription,
    ):
        store.failing = True
        with caplog.at_level(logging.WARNING, logger="pulse.bus.hub"):
            source.committed("t1", store.commit("t1"))
            await until(lambda: len(store.tries) >= 4)  # 0.1 + 0.2 + 0.4 s of waits
        gaps = [b - a for a, b in itertools.pairwise(store.tries)]
        # Each wait at least twice the one before it (a busy machine only lengthens them).
        assert all(gap >= 0.095 * 2**i for i, gap in enumerate(gaps)), gaps
        failed = hub.metrics.bus_read_failures.labels("error")._value.get()
        assert failed == len(store.tries)
        assert hub.read_problem() == (
            "reading new events from the table fails for 1 tenant (PermissionError): "
            "their streams get nothing; see the log"
        )
        [said] = [r for r in caplog.records if r.name == "pulse.bus.hub"]
        assert said.levelno == logging.ERROR and said.exc_info
        store.failing = False
        assert await received(subscription, 1) == [1]
        assert hub.read_problem() is None
