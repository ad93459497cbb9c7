"""A serving process collects its cyclic garbage in full once it has piled up.

From the soak audit of 7 December: with the server's thresholds a full collection
comes after about 100 million allocations, so in practice never; 310 streams with
churn grew Python's blocks from 509,000 to 1,091,000 (RSS 90 -> 154 MiB) in 32 minutes,
kept after every client had left. ``pulse.serving.collector.watch`` collects in full
once the blocks have grown by half since the last full collection.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import Iterator

import pytest

from pulse.serving import collector
from pulse.serving.collector import FullCollections
from tests.support import until

GARBAGE = 300_000  # objects in cycles: well over LEAST_GROWTH and half the test's heap


@pytest.fixture
def thresholds() -> Iterator[None]:
    """The server's thresholds (young collections only, in practice), then back."""
    before = gc.get_threshold()
    gc.set_threshold(50_000, 20, 100)
    yield
    gc.set_threshold(*before)


def test_a_collection_is_due_after_half_again_and_a_least_growth() -> None:
    policy = FullCollections(growth=1.5, least=100_000)
    policy.after = 1_000_000
    assert not policy.due(1_400_000)
    assert policy.due(1_600_000)
    policy.after = 100_000
    assert not policy.due(190_000)  # half again, but not worth a pause
    assert policy.due(210_000)


@pytest.mark.usefixtures("thresholds")
async def test_garbage_piled_up_is_collected_in_full() -> None:
    # The young collections leave it: these cycles are in the oldest generation, as a
    # closed connection's are (its objects lived through many collections).
    gc.collect()
    policy = FullCollections()
    lists = [[] for _ in range(GARBAGE)]
    for item in lists:
        item.append(item)
    gc.collect(1)  # moved to the oldest generation
    del lists, item
    piled = sys.getallocatedblocks()
    assert piled - policy.after > GARBAGE * 0.9  # still held
    watching = asyncio.create_task(collector.watch(every_s=0.05, policy=policy))
    try:
        await until(lambda: policy.made >= 1)
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    assert sys.getallocatedblocks() < piled - GARBAGE * 0.9
    assert policy.after < piled - GARBAGE * 0.9  # what it left: the next is measured from it


@pytest.mark.usefixtures("thresholds")
async def test_a_full_collection_of_cpythons_own_resets_the_measure() -> None:
    policy = FullCollections()
    watching = asyncio.create_task(collector.watch(every_s=3600, policy=policy))
    await asyncio.sleep(0)  # it has hooked gc.callbacks
    try:
        policy.after = 0
        gc.collect()
        assert policy.after > 0
        assert policy.made == 0
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
    assert all(callback.__name__ != "on_collection" for callback in gc.callbacks)
