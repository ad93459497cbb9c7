"""A resuming SSE test client that records what it received."""

from __future__ import annotations

import contextlib
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
        self, done: Callable[[ResumingClient], bool], *, drop_after: tuple[int, int] = (5, 60)
    ) -> None:
        async with httpx.AsyncClient(base_url=self.base_url, timeout=30) as client:
            while not done(self):
                await self._one_connection(client, self._random.randint(*drop_after), done)

    async def _one_connection(
        self, client: httpx.AsyncClient, budget: int, done: Callable[[ResumingClient], bool]
    ) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        self.connections += 1
        with contextlib.suppress(httpx.TransportError):
            async with client.stream("GET", SSE_PATH, headers=headers, params=self.params) as r:
                assert r.status_code == 200, r.status_code
                async for event in sse_events(r, comments=True):
                    if event.event == ":":
                        if done(self):
                            return
                        continue
                    if event.id is not None:
                        self.last_id = int(event.id)
                    if event.event is None:
                        self.ids.append(int(event.id or -1))
                        self.events.append(event.json())
                        budget -= 1
                    if budget <= 0 or done(self):
                        return
