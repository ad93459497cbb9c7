"""Batched: calls that come while a statement is in flight go together into the next."""

from __future__ import annotations

import asyncio

import pytest

from pulse.db.batch import Batched


class Recorder:
    """``run`` for a Batched: records each batch, and holds it until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()  # the first batch is in flight
        self.fail: Exception | None = None

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return [item * 10 for item in items]


async def _started(recorder: Recorder) -> None:
    await asyncio.wait_for(recorder.started.wait(), 5)


async def test_a_lone_call_runs_at_once_and_gets_its_own_answer() -> None:
    recorder = Recorder()
    batched = Batched(recorder.run)
    assert await batched(7) == 70
    assert recorder.batches == [[7]]


async def test_calls_during_a_statement_go_together_into_the_next() -> None:
    recorder = Recorder()
    recorder.release.clear()
    batched = Batched(recorder.run)
    first = asyncio.ensure_future(batched(1))
    await _started(recorder)
    rest = [asyncio.ensure_future(batched(n)) for n in range(2, 12)]
    await asyncio.sleep(0)
    recorder.release.set()
    assert await first == 10
    assert await asyncio.gather(*rest) == [n * 10 for n in range(2, 12)]
    assert recorder.batches == [[1], list(range(2, 12))]
    assert batched.statements == 2


async def test_a_batch_is_split_at_its_bound() -> None:
    recorder = Recorder()
    recorder.release.clear()
    batched = Batched(recorder.run, max_batch=4)
    calls = [asyncio.ensure_future(batched(n)) for n in range(10)]
    await _started(recorder)
    recorder.release.set()
    assert await asyncio.gather(*calls) == [n * 10 for n in range(10)]
    assert recorder.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


async def test_a_failed_statement_fails_its_callers_only() -> None:
    recorder = Recorder()
    recorder.release.clear()
    recorder.fail = RuntimeError("database away")
    batched = Batched(recorder.run)
    failing = [asyncio.ensure_future(batched(n)) for n in range(3)]
    await _started(recorder)
    recorder.release.set()
    for call in failing:
        with pytest.raises(RuntimeError, match="database away"):
            await call
    recorder.fail = None
    assert await batched(5) == 50


async def test_a_caller_that_goes_away_leaves_the_others_their_answers() -> None:
    recorder = Recorder()
    recorder.release.clear()
    batched = Batched(recorder.run)
    calls = [asyncio.ensure_future(batched(n)) for n in range(3)]
    await _started(recorder)
    calls[1].cancel()
    recorder.release.set()
    assert await calls[0] == 0
    assert await calls[2] == 20
    assert calls[1].cancelled()
    assert recorder.batches == [[0, 1, 2]]  # its item was sent all the same
