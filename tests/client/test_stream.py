"""The reconnect loop shared by every stream, driven by a session with no network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pulse.client.backoff import Backoff
from pulse.client.credentials import Credentials
from pulse.client.stream import ReconnectingStream


class Connection(ReconnectingStream[int]):
    """Sessions that yield numbers for ever, recording when each one is cleaned up."""

    def __init__(self) -> None:
        super().__init__(Credentials("token", None), Backoff())
        self.open = 0

    async def _session(self, token: str) -> AsyncIterator[int]:
        self.open += 1
        self._connected()
        try:
            n = 0
            while True:
                n += 1
                yield n
        finally:
            await asyncio.sleep(0)  # a close that has to await, like a socket's
            self.open -= 1


async def test_aclose_closes_the_connection_before_it_returns() -> None:
    stream = Connection()
    async for n in stream:
        if n == 3:
            break
    assert stream.open == 1
    await stream.aclose()
    assert stream.open == 0


async def test_cancelling_the_reader_closes_the_connection_with_it() -> None:
    stream = Connection()
    third = asyncio.Event()

    async def read() -> None:
        async with stream:
            async for n in stream:
                if n == 3:
                    third.set()
                    await asyncio.Event().wait()

    reader = asyncio.create_task(read())
    await third.wait()
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert stream.open == 0 and stream.connections == 1
