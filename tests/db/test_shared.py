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
