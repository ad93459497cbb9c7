"""Reads that many stream connections ask for at once, made once.

When a tenant's devices or alerts change, the hub signals every connection of
the tenant in the same instant, and each legacy v2 connection that follows the
fleet summary or the alerts would run the same query. ``SharedReads`` lets
them share one query in flight, without handing anyone data older than what
made them ask: a caller passes ``since``, the moment it learned of the change
(the signal's time), and joins a read only if that read started at or after
it. A change committed later is signalled again, and read again.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SharedReads(Generic[K, V]):
    def __init__(self, read: Callable[[K], Awaitable[V]]) -> None:
        self._read = read
        self._flights: dict[K, tuple[float, asyncio.Future[V]]] = {}
        self.reads = 0  # queries actually made (tests read it)

    async def get(self, key: K, since: float) -> V:
        """``read(key)``, from a read that started at or after ``since`` (monotonic)."""
        flight = self._flights.get(key)
        if flight is None or flight[0] < since:
            flight = (time.monotonic(), asyncio.ensure_future(self._read(key)))
            self._flights[key] = flight
            self.reads += 1
            flight[1].add_done_callback(functools.partial(self._land, key, flight))
        # Shielded: a caller that goes away does not cancel the others' read.
        return await asyncio.shield(flight[1])

    def _land(self, key: K, flight: tuple[float, asyncio.Future[V]], _: object) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        future = flight[1]
        if not future.cancelled():
            future.exception()  # retrieved: every caller may have gone away
