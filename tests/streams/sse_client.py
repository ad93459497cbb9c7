"""A resuming SSE test client that records what it received."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import httpx

from tests.support import sse_events

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"


class ResumingClient:
    """Reads the SSE stream, drops the connection at random moments, resumes with
    Last-Event-ID, and keeps every event id it received (duplicates included)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        params: dict[str, str] | None = None,
        seed: int = 0,
        last_id: int | None = 0,
    ) -> None:
        self.base_url = base_url
        self.token = token
        self.params = params or {}
        self.last_id = last_id
        self.ids: list[int] = []
        self.events: list[dict[str, object]] = []
        self.connections = 0
        self._random = random.Random(seed)

    async def run(
        self,
        done: Callable[[ResumingClient], bool],
        *,
        drop_after: tuple[int, int] = (5, 60),
        fallback_urls: tuple[str, ...] = (),
    ) -> None:
        """Until ``done``: read, drop, resume. When a server ends the stream or cannot be
        reached, move on to the next of ``base_url`` and ``fallback_urls``."""
        urls = [self.base_url, *fallback_urls]
        while not done(self):
            async with httpx.AsyncClient(base_url=urls[0], timeout=30) as client:
                while not done(self):
                    budget = self._random.randint(*drop_after)
                    if not await self._one_connection(client, budget, done):
                        urls.append(urls.pop(0))
                        await asyncio.sleep(0.05)
                        break

    async def _one_connection(
        self, client: httpx.AsyncClient, budget: int, done: Callable[[ResumingClient], bool]
    ) -> bool:
        """One connection; False when the server ended it or could not be reached."""
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        self.connections += 1
        try:
            async with client.stream("GET", SSE_PATH, headers=headers, params=self.params) as r:
                if r.status_code != 200:
                    return False
                async for event in sse_events(r, comments=True):
                    if event.event == ":":
                        if done(self):
                            return True
                        continue
                    if event.id is not None:
                        self.last_id = int(event.id)
                    if event.event is None:
                        self.ids.append(int(event.id or -1))
                        self.events.append(event.json())
                        budget -= 1
                    if budget <= 0 or done(self):
                        return True
        except httpx.TransportError:
            return False
        return False  # the server ended the stream
