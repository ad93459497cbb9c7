"""Ending a stream early: after `break`, on leaving the client, from another task.

From the user-experience audit: breaking out of ``async for e in pulse.sse()`` and then
leaving ``async with PulseClient(...)`` printed ``RuntimeError: athrow(): asynchronous
generator is already running``: the stream's generators, left open in a reference
cycle, were finalized by the garbage collector all at once. And ``stream.aclose()``
from a task other than the one iterating raised "already running" for the same reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from pulse.client import PulseClient
from pulse.client.stream import ReconnectingStream
from pulse.config import Settings
from tests.support import insert_readings, provision_device, running_server, until

pytestmark = pytest.mark.timeout(90)

# The audit's script (/tmp/audit-ux/brk.py), with the garbage collection that a busy
# program runs at some point between the `break` and the exit made certain.
BREAK_AND_LEAVE = """
import asyncio, gc, os, sys
from pulse.client import PulseClient

async def main():
    async with PulseClient(os.environ["PULSE_URL"], os.environ["PULSE_TOKEN"]) as p:
        async for e in (p.sse() if sys.argv[1] == "sse" else p.websocket()):
            print(e.device_id)
            break
        gc.collect()
        await asyncio.sleep(0.2)
    gc.collect()
    print("left the client")

asyncio.run(main())
"""


@pytest.fixture
async def url(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    await provision_device(pool, "t1", "d1")
    # Keepalives far apart: a stream that ends at once did not wait for one.
    slow = dataclasses.replace(settings, sse_keepalive_s=60.0, ws_ping_s=60.0)
    async with running_server(slow) as base:
        yield base


async def keep_writing(pool: asyncpg.Pool) -> None:
    while True:
        await insert_readings(pool, "t1", [("d1", {"temp": 21.0})])
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_break_then_leaving_the_client_is_quiet(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str], transport: str
) -> None:
    env = dict(os.environ, PULSE_URL=url, PULSE_TOKEN=make_token("t1"))
    writer = asyncio.create_task(keep_writing(pool))
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BREAK_AND_LEAVE, transport, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        writer.cancel()
    assert (proc.returncode, out.decode(), err.decode()) == (0, "d1\nleft the client\n", "")


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_aclose_from_another_task_ends_the_iteration_at_once(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str], transport: str
) -> None:
    async with PulseClient(url, make_token("t1")) as client:
        stream: ReconnectingStream[object] = (
            client.sse() if transport == "sse" else client.websocket()
        )
        seen: list[object] = []

        async def consume() -> None:
            async for event in stream:
                seen.append(event)

        reader = asyncio.create_task(consume())
        await until(lambda: stream.connections == 1)
        await asyncio.wait_for(stream.aclose(), 10)  # not the next keepalive, 60 s away
        async with asyncio.timeout(10):
            await reader  # ended, without raising
        assert stream.ended
        assert [e async for e in stream] == []  # a closed stream stays ended


async def test_leaving_the_client_while_a_task_iterates_ends_that_task_too(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    client = PulseClient(url, make_token("t1"))
    streams = [client.sse(), client.websocket()]

    async def consume(stream: ReconnectingStream[object]) -> int:
        return len([event async for event in stream])

    readers = [asyncio.create_task(consume(s)) for s in streams]
    await until(lambda: all(s.connections for s in streams))
    await asyncio.wait_for(client.aclose(), 10)  # returns once both connections are closed
    assert all(reader.done() for reader in readers)
    assert [reader.result() for reader in readers] == [0, 0]
