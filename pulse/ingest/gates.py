"""In-process locks by name, alive only while someone holds or awaits them."""

from __future__ import annotations

import contextlib
import dataclasses
from asyncio import Lock
from collections.abc import AsyncIterator, Iterable


@dataclasses.dataclass
class _Gate:
    lock: Lock = dataclasses.field(default_factory=Lock)
    users: int = 0


class KeyedLocks:
    def __init__(self) -> None:
        self._gates: dict[str, _Gate] = {}

    @contextlib.asynccontextmanager
    async def hold(self, keys: Iterable[str]) -> AsyncIterator[None]:
        """Hold the lock of every key, taken in sorted order so two holders cannot deadlock."""
        async with contextlib.AsyncExitStack() as stack:
            for key in sorted(set(keys)):
                await stack.enter_async_context(self._hold_one(key))
            yield

    @contextlib.asynccontextmanager
    async def _hold_one(self, key: str) -> AsyncIterator[None]:
        gate = self._gates.setdefault(key, _Gate())
        gate.users += 1
        try:
            async with gate.lock:
                yield
        finally:
            gate.users -= 1
            if gate.users == 0:
                del self._gates[key]

    def __len__(self) -> int:
        return len(self._gates)
