"""The replay-then-live loop on the in-memory source: exact from any position, and a
stream starting beside others of its tenant asks the table nothing it need not."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from pulse.bus.events import TelemetryEvent
from pulse.bus.hub import Hub
from pulse.bus.subscription import Filters
from pulse.errors import CONNECTION_LIMIT
from pulse.streams.live import REPLAY_PAGE, End, Item, Live, Reset, Started, parts
from tests.bus.memory import MemorySource, MemoryStore, running_hub


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.newest_reads = 0

    async def newest_id(self, tenant_id: str) -> int:
        self.newest_reads += 1
        return await super().newest_id(tenant_id)


@contextlib.asynccontextmanager
async def hub_counting_reads() -> AsyncIterator[tuple[Hub, MemorySource, CountingStore]]:
    store = CountingStore()
    async with running_hub(store=store) as (hub, source, _):
        yield hub, source, store


def stream(
    hub: Hub, store: MemoryStore, last_event_id: int | None = None, *, announces_start: bool = False
) -> Live:
    return Live(
        hub,
        store,  # type: ignore[arg-type]
        "t1",
        Filters(),
        kind="test",
        expires_at=time.time() + 60,
        idle_s=lambda: None,
        last_event_id=last_event_id,
        announces_start=announces_start,
    )


async def take(items: AsyncGenerator[Item, None], through: int) -> list[Item | int]:
    """Items until the event ``through`` (0: until Started): events as their ids, the rest
    as they are."""
    out: list[Item | int] = []
    async with asyncio.timeout(5):
        async for item in items:
            if isinstance(item, list):
                out += [e.id for e in item]
                if item[-1].id >= through:
                    return out
            else:
                out.append(item)
                if isinstance(item, Started) and through == 0:
                    return out
    raise AssertionError(f"the stream ended before {through}: {out}")


def commit(source: MemorySource, store: MemoryStore, count: int = 1) -> int:
    newest = store.commit("t1", count=count)
    source.committed("t1", newest)
    return newest


@contextlib.asynccontextmanager
async def hub_behind_the_table() -> AsyncIterator[tuple[Hub, MemorySource, CountingStore]]:
    """A tenant whose hub has delivered 3 (to a stream kept open) while 5 are committed:
    the wake-up for 4 and 5 is on its way (``source.committed("t1", 5)`` delivers it)."""
    async with (
        hub_counting_reads() as (hub, source, store),
        contextlib.aclosing(stream(hub, store).items()) as a,
    ):
        await take(a, 0)
        await take(a, commit(source, store, 3))
        store.commit("t1", count=2)
        yield hub, source, store


async def test_a_stream_beside_another_of_its_tenant_starts_without_a_query() -> None:
    async with hub_counting_reads() as (hub, source, store):
        first = stream(hub, store)
        async with contextlib.aclosing(first.items()) as a:
            assert await take(a, 0) == [Started(0)]
            await take(a, commit(source, store, 3))  # the hub has delivered 3
            store.newest_reads = 0
            second = stream(hub, store)
            async with contextlib.aclosing(second.items()) as b:
                assert await take(b, 0) == [Started(3)]
                newest = commit(source, store, 2)
                assert await take(b, newest) == [4, 5]
                assert await take(a, newest) == [4, 5]
            assert store.newest_reads == 0


async def test_a_resume_ahead_of_what_this_process_delivered_asks_the_table() -> None:
    """A client that read event 5 from another process, here where the hub has only
    delivered 3 so far: no unknown_position reset, and 4 and 5 are not sent again."""
    async with hub_behind_the_table() as (hub, source, store):
        store.newest_reads = 0
        async with contextlib.aclosing(stream(hub, store, last_event_id=5).items()) as b:
            assert await take(b, 0) == [Started(5)]
            assert store.newest_reads == 1
            source.committed("t1", 5)  # 4 and 5 reach the hub now
            newest = commit(source, store)
            got = await take(b, newest)
            assert got == [6] and not any(isinstance(i, Reset) for i in got)


async def test_a_resume_from_behind_replays_then_goes_live_exactly() -> None:
    async with (
        hub_counting_reads() as (hub, source, store),
        contextlib.aclosing(stream(hub, store).items()) as a,
    ):
        await take(a, 0)
        await take(a, commit(source, store, 4))
        async with contextlib.aclosing(stream(hub, store, last_event_id=1).items()) as b:
            first = await take(b, 4)
            assert first == [Started(4), 2, 3, 4]
            newest = commit(source, store, 2)
            assert await take(b, newest) == [5, 6]


async def test_a_stream_that_announces_its_start_announces_the_newest_committed_id() -> None:
    """The WebSocket's "connected" says the tenant's newest committed id: 5, committed
    before the connect, not 3, the newest the hub has delivered so far. A stream that
    announces nothing may start at 3 and get 4 and 5 live."""
    async with hub_behind_the_table() as (hub, source, store):
        announcing = stream(hub, store, announces_start=True)
        silent = stream(hub, store)
        async with (
            contextlib.aclosing(announcing.items()) as b,
            contextlib.aclosing(silent.items()) as c,
        ):
            assert await take(b, 0) == [Started(5)]
            assert await take(c, 0) == [Started(3)]
            source.committed("t1", 5)
            newest = commit(source, store)
            assert await take(b, newest) == [6]
            assert await take(c, newest) == [4, 5, 6]


async def test_a_stream_ended_from_outside_ends_with_the_error_given() -> None:
    """``end`` (the connection limit, after a lapsed lease) ends a live stream and one
    still opening alike, with that error, not the shutdown's."""
    async with hub_counting_reads() as (hub, source, store):
        live = stream(hub, store)
        async with contextlib.aclosing(live.items()) as a:
            await take(a, 0)
            await take(a, commit(source, store))
            live.end(CONNECTION_LIMIT)
            async with asyncio.timeout(5):
                assert await anext(a) == End(CONNECTION_LIMIT)
        opening = stream(hub, store)
        opening.end(CONNECTION_LIMIT)  # before it has subscribed
        async with contextlib.aclosing(opening.items()) as b:
            async with asyncio.timeout(5):
                assert [item async for item in b] == [Started(1), End(CONNECTION_LIMIT)]


class TrimmedStore(MemoryStore):
    """A table whose oldest rows retention drops: ids below ``kept_from`` are gone."""

    def __init__(self) -> None:
        super().__init__()
        self.kept_from = 1

    async def earliest_id(self, tenant_id: str) -> int | None:
        newest = await self.newest_id(tenant_id)
        return self.kept_from if self.kept_from <= newest else None

    async def events_after(self, tenant_id: str, after: int, **kw: Any) -> list[TelemetryEvent]:
        return await super().events_after(tenant_id, max(after, self.kept_from - 1), **kw)


async def test_rows_dropped_while_a_replay_runs_are_announced_as_trimmed() -> None:
    """From the time audit (MEDIUM): a client resuming from the oldest day kept, while
    retention dropped that day's partition in the middle of its replay, got events up
    to the drop and then the next day's, 12,000 missing, with no reset. The replay now
    says history_trimmed, with the earliest id kept, as it would have at the start."""
    store = TrimmedStore()
    async with running_hub(store=store) as (hub, source, _):
        newest = commit(source, store, 2 * REPLAY_PAGE + 500)
        resumed = stream(hub, store, last_event_id=0)
        async with contextlib.aclosing(resumed.items()) as items:
            assert await anext(items) == Started(newest)
            first = await anext(items)
            assert isinstance(first, list) and first[-1].id == REPLAY_PAGE
            store.kept_from = REPLAY_PAGE + 1000  # a day dropped under the replay
            rest = await take(items, newest)
    assert rest[0] == Reset({"reason": "history_trimmed", "earliest_id": REPLAY_PAGE + 1000})
    assert rest[1:] == list(range(REPLAY_PAGE + 1000, newest + 1))


def test_parts_cut_a_batch_by_its_bytes_and_keep_its_order() -> None:
    def event(i: int, size: int) -> TelemetryEvent:
        return TelemetryEvent(i, "d1", "2026-12-06T00:00:00.000Z", "x" * size)

    batch = [event(i, 100) for i in range(1, 11)]
    assert [[e.id for e in p] for p in parts(batch, limit=350)] == [
        [1, 2, 3],
        [4, 5, 6],
        [7, 8, 9],
        [10],
    ]
    assert list(parts(batch, limit=10_000)) == [batch]  # the batch itself: no copy
    huge = [event(1, 50), event(2, 1000), event(3, 50)]
    assert [[e.id for e in p] for p in parts(huge, limit=500)] == [[1], [2], [3]]
    assert list(parts([], limit=500)) == []
