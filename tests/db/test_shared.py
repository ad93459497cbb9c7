"""SharedReads with an in-memory read: who shares a read, and who gets a fresh one."""

from __future__ import annotations

import asyncio
import time

import pytest

from pulse.db.shared import SharedReads


class Source:
    """A value that changes, and a read of it that takes a while."""

    def __init__(self) -> None:
        self.value = 0
        self.calls = 0
        self.gate = asyncio.Event()
        self.started = asyncio.Event()

    async def read(self, key: str) -> tuple[str, int]:
        self.calls += 1
        self.started.set()
        seen = self.value  # the read's snapshot is taken as it starts
        await self.gate.wait()
        return key, seen


async def test_callers_that_learned_before_a_read_started_share_it() -> None:
    source = Source()
    reads = SharedReads(source.read)
    since = time.monotonic()
    callers = [asyncio.create_task(reads.get("t1", since)) for _ in range(100)]
    await asyncio.sleep(0)
    source.gate.set()
    assert await asyncio.gather(*callers) == [("t1", 0)] * 100
    assert source.calls == reads.reads == 1


async def test_a_caller_that_learned_later_gets_a_read_of_its_own() -> None:
    source = Source()
    reads = SharedReads(source.read)
    first = asyncio.create_task(reads.get("t1", time.monotonic()))
    await source.started.wait()  # the first read has started, and seen 0
    source.value = 1  # a change, signalled after that read started
    later = asyncio.create_task(reads.get("t1", time.monotonic()))
    await asyncio.sleep(0)
    source.gate.set()
    assert await first == ("t1", 0)
    assert await later == ("t1", 1)
    assert source.calls == 2


async def test_keys_do_not_share() -> None:
    source = Source()
    reads = SharedReads(source.read)
    source.gate.set()
    since = time.monotonic()
    assert await asyncio.gather(reads.get("t1", since), reads.get("t2", since)) == [
        ("t1", 0),
        ("t2", 0),
    ]
    assert source.calls == 2


async def test_a_finished_read_is_not_reused() -> None:
    source = Source()
    source.gate.set()
    reads = SharedReads(source.read)
    since = time.monotonic()
    await reads.get("t1", since)
    source.value = 1
    assert await reads.get("t1", since) == ("t1", 1)
    assert source.calls == 2


async def test_an_error_reaches_every_caller_and_the_next_read_is_fresh() -> None:
    calls = 0

    async def failing(key: str) -> int:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 1:
            raise ConnectionError("database gone")
        return calls

    reads: SharedReads[str, int] = SharedReads(failing)
    since = time.monotonic()
    results = await asyncio.gather(
        *(reads.get("t1", since) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await reads.get("t1", since) == 2


async def test_a_caller_that_goes_away_does_not_cancel_the_read() -> None:
    source = Source()
    reads = SharedReads(source.read)
    since = time.monotonic()
    leaver = asyncio.create_task(reads.get("t1", since))
    stayer = asyncio.create_task(reads.get("t1", since))
    await asyncio.sleep(0)
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    source.gate.set()
    assert await stayer == ("t1", 0)
    assert source.calls == 1


async def test_fresh_callers_during_a_read_share_the_next_one() -> None:
    """A read that started before a caller asked may miss what it asks for: the callers
    that come during a read share the next one, which starts when that one lands."""
    source = Source()
    reads = SharedReads(source.read)
    first = asyncio.create_task(reads.fresh("t1"))
    await source.started.wait()
    source.value = 1  # committed before the next callers ask
    burst = [asyncio.create_task(reads.fresh("t1")) for _ in range(100)]
    await asyncio.sleep(0)
    assert source.calls == 1  # they wait for the read ahead: one at a time
    source.gate.set()
    assert await first == ("t1", 0)
    assert await asyncio.gather(*burst) == [("t1", 1)] * 100
    assert source.calls == reads.reads == 2
    # With nothing in flight, a caller's read starts at once.
    source.value = 2
    assert await reads.fresh("t1") == ("t1", 2)
    assert source.calls == 3


async def test_a_fresh_read_that_fails_fails_its_callers_only() -> None:
    calls = 0
    gate = asyncio.Event()

    async def failing(key: str) -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        if calls == 2:
            raise ConnectionError("database gone")
        return calls

    reads: SharedReads[str, int] = SharedReads(failing)
    first = asyncio.create_task(reads.fresh("t1"))
    await asyncio.sleep(0)
    second = [asyncio.create_task(reads.fresh("t1")) for _ in range(3)]
    leaver = asyncio.create_task(reads.fresh("t1"))
    await asyncio.sleep(0)
    leaver.cancel()  # going away cancels no read
    gate.set()
    assert await first == 1
    results = await asyncio.gather(*second, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    assert await reads.fresh("t1") == 3
