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


def test_a_due_collection_waits_while_the_loop_is_busy() -> None:
    """Measured in a reconnect storm: a full collection mid-storm stopped the server for
    2.1-3.3 s and found no garbage (the blocks were the connections arriving), and one in
    the blip after it 3.9-5.8 s. A due collection now waits for a check that is not busy
    (connections arriving)."""
    policy = FullCollections(growth=1.5, least=100_000, busy_wait_s=60)
    policy.after = 1_000_000
    assert not policy.now(1_400_000, at=0, busy=False)  # not due
    assert not policy.now(1_800_000, at=10, busy=True)  # due, put off
    assert not policy.now(2_500_000, at=20, busy=True)
    assert policy.now(2_600_000, at=30, busy=False)
    policy.left()  # the collection's end (CPython's callback says it too)
    assert policy.due_since is None


def test_a_busy_loop_puts_a_due_collection_off_for_a_while_only() -> None:
    policy = FullCollections(growth=1.5, least=100_000, busy_wait_s=60)
    policy.after = 1_000_000
    assert not policy.now(1_600_000, at=100, busy=True)
    assert not policy.now(1_600_000, at=159, busy=True)
    assert policy.now(1_600_000, at=160, busy=True)


def test_a_collection_no_longer_due_is_not_made_once_the_loop_is_free() -> None:
    policy = FullCollections(growth=1.5, least=100_000, busy_wait_s=60)
    policy.after = 1_000_000
    assert not policy.now(2_000_000, at=0, busy=True)
    assert not policy.now(1_200_000, at=10, busy=False)  # freed since (refcounts)
    assert policy.due_since is None


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
async def test_piled_garbage_waits_while_connections_arrive() -> None:
    """The watch asks how many connections arrived since its last check: with a hundred
    or more (a storm) the due collection waits, and is made at the first quiet check."""
    gc.collect()
    policy = FullCollections()
    lists = [[] for _ in range(GARBAGE)]
    for item in lists:
        item.append(item)
    gc.collect(1)
    del lists, item
    arrived = checks = 0

    def arrivals() -> int:
        nonlocal checks
        checks += 1
        return arrived

    watching = asyncio.create_task(collector.watch(every_s=0.05, policy=policy, arrivals=arrivals))
    try:
        await until(lambda: checks >= 1)  # the watch has started
        for _ in range(5):  # five checks, each after a storm's worth of connections
            arrived += collector.BUSY_ARRIVALS
            await until(lambda done=checks + 1: checks >= done)
            assert policy.due_since is not None, "due"
            assert policy.made == 0
        await until(lambda: policy.made >= 1)  # the storm over
    finally:
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching


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
