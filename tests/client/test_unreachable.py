"""Reads sent while no server answers (a restart, a deploy): asked again, as busy ones are.

Before, ``history()``, ``fleet_summary()``, ``iter_readings()`` and the other reads
raised httpx's ConnectError the moment a server was restarting, while a ``503`` from the
same restart was waited out for ``busy_wait_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from pulse.client import PulseClient
from pulse.client.errors import PulseClientError
from tests.client.restartable import restartable_server
from tests.support import free_port, provision_device, until

pytestmark = pytest.mark.timeout(120)


async def test_a_read_waits_for_a_restarting_server_and_is_answered(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    await provision_device(pool, "t1", "d1")
    waits: list[tuple[PulseClientError, float]] = []
    async with restartable_server(database_url, tmp_path) as server:
        await server.stop()
        async with PulseClient(
            server.url, make_token("t1"), on_busy=lambda e, s: waits.append((e, s))
        ) as client:
            summary = asyncio.create_task(client.fleet_summary())
            await until(lambda: len(waits) >= 2, timeout=20)
            assert not summary.done()
            await server.start()
            answered = await asyncio.wait_for(summary, 60)
    assert answered.total == 1
    refusal, delay_s = waits[0]
    assert (refusal.status, refusal.code, delay_s) == (0, "unreachable", 1.0)
    assert "ConnectError" in refusal.detail


async def test_a_read_gives_up_after_busy_wait_s_with_the_network_error(
    make_token: Callable[..., str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    waits: list[tuple[PulseClientError, float]] = []
    async with PulseClient(
        url, make_token("t1"), busy_wait_s=2.5, on_busy=lambda e, s: waits.append((e, s))
    ) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ConnectError):
            await client.fleet_summary()
    assert len(waits) == 2  # tried at 0 s, 1 s and 2 s; a third wait would pass 2.5 s
    assert time.monotonic() - started >= 2.0


async def test_a_change_is_not_sent_again(make_token: Callable[..., str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    waits: list[tuple[PulseClientError, float]] = []
    async with PulseClient(
        url, make_token("t1", roles=("tenant-admin",)), on_busy=lambda e, s: waits.append((e, s))
    ) as client:
        with pytest.raises(httpx.ConnectError):
            await client.acknowledge_alert(1)
    assert waits == []


@pytest.mark.parametrize("address", ["127.0.0.1:8000", "localhost", "ftp://h", "http://"])
def test_an_address_that_is_no_server_s_is_refused_at_once(address: str) -> None:
    """From the client review of 7 December: `PulseClient("127.0.0.1:8000", ...)` made an
    SSE stream that took httpx's UnsupportedProtocol for a lost connection and tried
    again for ever, where the REST helpers and WebSockets failed at once (and, before the
    review of the retries, waited busy_wait_s first)."""
    with pytest.raises(ValueError, match="is not a server's address: give http://HOST:PORT"):
        PulseClient(address, "token")
