"""Replies waiting for a WebSocket client that does not read them are bounded in bytes."""

from __future__ import annotations

import asyncio
import types

import pytest

from pulse.errors import LAGGING
from pulse.web.websocket import OUTBOX_BYTES, OUTBOX_SIZE, Close, Connection


class UnreadSocket:
    """A client that never reads: every send waits for ever."""

    scope = {"type": "websocket", "query_string": b"", "headers": []}
    args: dict[str, str] = {}

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, text: str) -> None:
        self.sent += 1
        await asyncio.Event().wait()


def connection() -> Connection:
    rt = types.SimpleNamespace(settings=types.SimpleNamespace(direct_writes=False))
    return Connection(UnreadSocket(), rt)  # type: ignore[arg-type]


async def test_large_replies_are_cut_by_their_bytes() -> None:
    """From the abuse audit (HIGH): set_metrics with a thousand long names (a frame just
    under 64 KiB) is answered with the whole list; 256 such replies waited per client
    that did not read them, 16 MB a connection: 60 connections of one token took the
    process from 742 MB to 2.19 GB. The outbox is bounded in bytes as well as in count."""
    conn = connection()
    reply = {"type": "metrics_updated", "metrics": ["m" * 60] * 1000}  # about 63 KiB
    queued = 0
    with pytest.raises(Close) as cut:
        for _ in range(OUTBOX_SIZE):
            conn.reply(reply)
            queued += 1
            await asyncio.sleep(0)  # the sender takes the first, and waits on it
    assert cut.value.code == LAGGING.close
    assert queued * 63_000 <= OUTBOX_BYTES + 64 * 1024, queued
    with pytest.raises(Close):  # ends normally, and stops the sender
        await conn.run(asyncio.sleep(0))


async def test_small_replies_are_cut_by_their_count() -> None:
    conn = connection()
    with pytest.raises(Close):
        for _ in range(OUTBOX_SIZE + 2):
            conn.reply({"type": "pong"})
            await asyncio.sleep(0)
    with pytest.raises(Close):
        await conn.run(asyncio.sleep(0))
