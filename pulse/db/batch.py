"""Writes that many requests make at once, made in one statement.

After a deploy every dashboard takes a stream ticket and then spends it: two
statements per client, each a pool connection, a round trip and a commit of its
own, and a storm of clients queues for the pool's few connections. ``Batched``
gives each caller the answer to its own item of a statement made for many: a
call when nothing is in flight starts a statement at once; calls that come while
one runs go together into the next. So nothing waits when the server is quiet,
and a storm costs one statement per batch.

A caller that goes away gives up its answer, not its item: what was sent is
done, as with a statement cancelled on the wire after it reached the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Items in one statement at most: bounds its parameters and its time.
MAX_BATCH = 500


class Batched(Generic[T, R]):
    """``run(items)`` for the items of callers that come together; ``run`` answers each
    item, in order."""

    def __init__(
        self, run: Callable[[list[T]], Awaitable[Sequence[R]]], max_batch: int = MAX_BATCH
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.statements = 0  # batches run (tests read it)

    async def __call__(self, item: T) -> R:
        answer: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, answer))
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return await answer

    async def _flush(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                self.statements += 1
                try:
                    answers = await self._run([item for item, _ in batch])
                except Exception as exc:
                    for _, answer in batch:
                        if not answer.done():
                            answer.set_exception(exc)
                else:
                    for (_, answer), value in zip(batch, answers, strict=True):
                        if not answer.done():
                            answer.set_result(value)
                batch = []
        finally:
            self._flusher = None
            # Cancelled (the process stopping): nobody is left waiting forever.
            for _, answer in batch + self._waiting:
                answer.cancel()
            self._waiting.clear()
