"""Reads that many stream connections ask for at once, made once.

When a tenant's devices or alerts change, the hub signals every connection of
the tenant in the same instant, and each legacy v2 connection that follows the
fleet summary or the alerts would run the same query. ``SharedReads`` lets
them share one query in flight, without handing anyone data older than what
made them ask: a caller passes ``since``, the moment it learned of the change
(the signal's time), and joins a read only if that read started at or after
it. A change committed later is signalled again, and read again.

``fresh`` is for callers with no such moment, only the rule that the read must
start after they ask (a stream's start position): one read of a key runs at a
time, and every caller that comes meanwhile shares the next. A burst of
reconnecting streams is then two reads, not one per stream.
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
        self._next: dict[K, asyncio.Future[V]] = {}  # fresh(): waiting for the read ahead
        self.reads = 0  # queries actually made (tests read it)

    async def get(self, key: K, since: float) -> V:
        """``read(key)``, from a read that started at or after ``since`` (monotonic)."""
        flight = self._flights.get(key)
        if flight is None or flight[0] < since:
            flight = self._start(key)
        # Shielded: a caller that goes away does not cancel the others' read.
        return await asyncio.shield(flight[1])

    async def fresh(self, key: K) -> V:
        """``read(key)``, from a read that starts after this call: the next one, which
        starts when the read in flight (if any) has landed, for every caller until then."""
        following = self._next.get(key)
        if following is None:
            following = self._next[key] = asyncio.get_running_loop().create_future()
            flight = self._flights.get(key)
            if flight is None:
                self._take_off(key)
            else:
                flight[1].add_done_callback(lambda _: self._take_off(key))
        return await asyncio.shield(following)

    def _start(self, key: K) -> tuple[float, asyncio.Future[V]]:
        flight = (time.monotonic(), asyncio.ensure_future(self._read(key)))
        self._flights[key] = flight
        self.reads += 1
        flight[1].add_done_callback(functools.partial(self._land, key, flight))
        return flight

    def _take_off(self, key: K) -> None:
        """Start the read that the callers of ``fresh`` waiting for ``key`` share."""
        following = self._next.pop(key)
        self._start(key)[1].add_done_callback(functools.partial(_settle, following))

    def _land(self, key: K, flight: tuple[float, asyncio.Future[V]], _: object) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        future = flight[1]
        if not future.cancelled():
            future.exception()  # retrieved: every caller may have gone away


def _settle(target: asyncio.Future[V], read: asyncio.Future[V]) -> None:
    """Give ``target`` the outcome of ``read``."""
    if target.done():
        return
    if read.cancelled():
        target.cancel()
    elif (error := read.exception()) is not None:
        target.set_exception(error)
        target.exception()  # retrieved: every caller may have gone away
    else:
        target.set_result(read.result())
