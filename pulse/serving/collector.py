"""The cyclic garbage collector of a serving process: tuned for few pauses, and a full
collection whenever garbage has piled up, which the tuning alone would put off for hours.

A streaming server's connections live for minutes, so their objects have moved to the
oldest generation by the time they close, and the cycles they leave (a protocol and its
transport, a task and its coroutine) wait there for a full collection. CPython runs one
after ``threshold2`` collections of the middle generation, each after ``threshold1`` of
the young one, each after ``threshold0`` more objects than were freed: with the
thresholds below, about 100 million, so in practice never. A soak of 310 streams with
churn grew Python's blocks from 509,000 to 1,091,000 (RSS 90 -> 154 MiB) in 32 minutes
without one, and kept it all once the clients had left; a forced full collection then
left 398,000. ``watch`` collects when the blocks have grown by half since the last full
collection, so garbage stays below about half of what is live, as CPython's own rule
for full collections intends (it waits for a quarter more), at a pause of ~90 ms per
500,000 objects the collector tracks.

Not while connections arrive, though: in a reconnect storm the heap grows by the
connections coming in, live objects, and a collection would stop the event loop in the
middle of their admission to walk them, every client arriving meanwhile left waiting.
Timed in a server during `python -m benchmarks reconnect-sse` (a busy machine): 1.2-3.4
s for one that found no garbage at all, mid-storm, and 1.8-6.6 s in the blip after it
(every client dropping and coming back: garbage and new connections together, the heap
hardly growing). A due collection waits for a check with fewer than BUSY_ARRIVALS new
connections since the one before (``arrivals``: hypercorn's connections, counted by
``pulse.serving.idle``), at most BUSY_WAIT_S.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

CHECK_S = 10.0
GROWTH = 1.5  # blocks after the last full collection, times this: collect
LEAST_GROWTH = 100_000  # blocks: below this much garbage, a collection is not worth it
BUSY_ARRIVALS = 100  # new connections since the check before: a storm, not now
BUSY_WAIT_S = 60.0  # a due collection waits for a check that is not busy at most this long


def tune() -> None:
    """Fewer, cheaper collections: a streaming server holds many long-lived objects.

    With CPython's defaults, a process serving 1000 SSE subscribers spent about
    10% of its time in the cyclic collector, in pauses of up to 238 ms (full
    collections walking every connection's objects), straight into the p99 of
    every stream. What was imported and built before serving is frozen out of
    collections for good, and young objects get more room before a collection
    (most are gone by then). Same benchmark: no pause over 2 ms in gen 1 or 2, the
    largest young collection 41 ms; fan-out p99 342 -> 220 ms at 20 events/s.
    Full collections are then ``watch``'s.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class FullCollections:
    """When to collect in full: after ``growth`` times the blocks left by the last full
    collection (CPython's own included), and at least ``least`` more; at a check that is
    not busy, or ``busy_wait_s`` after it was first due."""

    def __init__(
        self, growth: float = GROWTH, least: int = LEAST_GROWTH, busy_wait_s: float = BUSY_WAIT_S
    ) -> None:
        self._growth = growth
        self._least = least
        self._busy_wait_s = busy_wait_s
        self.after = sys.getallocatedblocks()  # what the last full collection left
        self.due_since: float | None = None  # while due and put off: since when
        self.made = 0  # full collections made here

    def due(self, blocks: int) -> bool:
        return blocks > self.after * self._growth and blocks - self.after > self._least

    def now(self, blocks: int, at: float, busy: bool) -> bool:
        """At a check (``blocks`` then, at monotonic time ``at``, the loop ``busy`` since
        the check before or not): whether to collect."""
        if not self.due(blocks):
            self.due_since = None
            return False
        if self.due_since is None:
            self.due_since = at
        return not busy or at - self.due_since >= self._busy_wait_s

    def collect(self) -> None:
        gc.collect()
        self.made += 1
        self.left()

    def left(self, *_: Any) -> None:
        """A full collection has ended (here, or CPython's: ``gc.callbacks``)."""
        self.after = sys.getallocatedblocks()
        self.due_since = None


async def watch(
    every_s: float = CHECK_S,
    policy: FullCollections | None = None,
    arrivals: Callable[[], int] = lambda: 0,
) -> None:
    """Until cancelled: a full collection whenever ``policy`` says so, asked every
    ``every_s`` seconds (the blocks: a sum over the allocator's arenas, microseconds);
    busy when ``arrivals()``, connections made since the process started, grew by
    BUSY_ARRIVALS or more since the check before."""
    policy = policy or FullCollections()
    loop = asyncio.get_running_loop()

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "stop" and info["generation"] == 2:
            policy.left()

    gc.callbacks.append(on_collection)
    try:
        arrived = arrivals()
        while True:
            await asyncio.sleep(every_s)
            busy, arrived = arrivals() - arrived >= BUSY_ARRIVALS, arrivals()
            if policy.now(sys.getallocatedblocks(), loop.time(), busy):
                policy.collect()
    finally:
        gc.callbacks.remove(on_collection)
