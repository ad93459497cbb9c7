"""InboundQueue: what a connection received, on its way to the code that handles it.

It stands between a WebSocket's socket and its handler as hypercorn's queue of
ASGI events for the app (pulse.serving.direct), in place of an asyncio.Queue
(the handler then reads those events itself: pulse.serving.websocket):

- bounded, so that a client sending faster than its handler reads is held
  back by TCP (hypercorn stops reading its socket) instead of piling up in
  memory;
- small, because an idle connection is mostly such structures: an
  asyncio.Queue allocates three deques and an Event up front, about 3 KB, and
  this holds one list until something waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class InboundQueue(Generic[T]):
    __slots__ = ("_closed", "_getters", "_items", "_putters", "_size", "_watcher")

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: list[T] = []
        self._getters: list[asyncio.Future[None]] = []
        self._putters: list[asyncio.Future[None]] = []
        self._watcher: Callable[[T], None] | None = None
        self._closed = False

    def close(self) -> None:
        """Nobody reads any more (the app has ended): what comes is dropped, and a put
        waiting for room returns. The server's reader may be waiting in ``put`` when
        the app ends (a client cut for not reading its replies, still sending): it
        would wait for ever, never reading the client's close, and the connection
        stayed open with megabytes unread, counted by no limit."""
        self._closed = True
        self._items.clear()
        for waiter in self._putters:
            if not waiter.done():
                waiter.set_result(None)
        self._putters.clear()

    def watch(self, callback: Callable[[T], None] | None) -> None:
        """Call ``callback`` with each item queued and each put from now on (None: stop).

        For a handler that reads nothing more but must know when something comes
        (an SSE stream, the client's going away), without a task waiting in ``get``.
        """
        self._watcher = callback
        if callback is not None:
            for item in list(self._items):
                callback(item)

    async def get(self) -> T:
        while not self._items:
            await _wait(self._getters)
        item = self._items.pop(0)
        _wake_one(self._putters)
        return item

    async def put(self, item: T) -> None:
        while len(self._items) >= self._size and not self._closed:
            await _wait(self._putters)
        if self._closed:
            return
        self._items.append(item)
        _wake_one(self._getters)
        if self._watcher is not None:
            self._watcher(item)

    def qsize(self) -> int:
        return len(self._items)


async def _wait(waiters: list[asyncio.Future[None]]) -> None:
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except asyncio.CancelledError:
        if waiter in waiters:
            waiters.remove(waiter)
        elif not waiter.cancelled():
            _wake_one(waiters)  # woken and cancelled at once: pass the turn on
        raise


def _wake_one(waiters: list[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.pop(0)
        if not waiter.done():
            waiter.set_result(None)
            return
