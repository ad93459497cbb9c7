"""History reads while the tenant's history slots are taken: the client waits its turn.

From the user-experience audit: one dashboard tab takes all of a tenant's history
slots, and ``history()``, ``fleet_history()`` and ``iter_readings()`` raised ``429
history_limit`` at once (``iter_readings`` mid-paging, its position lost). Here the
tenant has one slot, held by a read that waits on the readings the test keeps locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from pulse.client import PulseClient
from pulse.client.errors import PulseClientError
from pulse.config import Settings
from tests.history.readings import readings_at
from tests.support import provision_device, running_server, until

pytestmark = pytest.mark.timeout(90)

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
END = T0 + timedelta(minutes=30)
DEVICE = "/api/v1/customer/devices/d1/telemetry"
WINDOW = {"from": "2026-12-01T10:00:00Z", "to": "2026-12-01T11:00:00Z", "bucket": "raw"}


@pytest.fixture
async def server(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    await provision_device(pool, "t1", "d1")
    await readings_at(
        pool, "t1", [("d1", T0 + timedelta(seconds=30 * i), {"temp": float(i)}) for i in range(40)]
    )
    one_slot = dataclasses.replace(settings, max_history_reads_per_tenant=1)
    async with running_server(one_slot) as url:
        yield url


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def slot_held(url: str, token: str, dsn: str) -> AsyncIterator[None]:
    """t1's one history slot, taken by a page of readings that waits on the telemetry
    table the test keeps locked, until the block ends (then that page is answered).
    The lock is held on a connection of its own: a pooled one is ended after 15 s idle
    in its transaction (pulse.db.pool), which a busy machine reached."""
    locker = await asyncpg.connect(dsn)
    async with httpx.AsyncClient(
        base_url=url, timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as http:
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
        held = asyncio.create_task(http.get(DEVICE, params=WINDOW))
        try:
            # Its slot is taken (the server's gauge), whatever else waits on the lock:
            # the server's own partition upkeep may too, on a busy machine.
            await eventually(lambda: _history_reads(http, 1))
            yield
        finally:
            await lock.rollback()
            await locker.close()
            assert (await held).status_code == 200


async def _history_reads(http: httpx.AsyncClient, expected: int) -> bool:
    text = (await http.get("/metrics")).text
    return f"\npulse_history_reads {expected:.1f}\n" in text


async def test_history_and_fleet_history_wait_for_a_slot(
    server: str, database_url: str, make_token: Callable[..., str]
) -> None:
    waits: list[tuple[PulseClientError, float]] = []
    async with PulseClient(
        server, make_token("t1"), on_busy=lambda e, s: waits.append((e, s))
    ) as client:
        async with slot_held(server, make_token("t1"), database_url):
            history = asyncio.create_task(
                client.history("d1", start=T0, end=END, bucket="5m", aggregates=["count"])
            )
            fleet = asyncio.create_task(
                client.fleet_history("temp", start=T0, end=END, bucket="1h")
            )
            await until(lambda: len(waits) >= 2, timeout=20)
            assert not history.done() and not fleet.done()
        refusal, delay_s = waits[0]
        assert (refusal.status, refusal.code, delay_s) == (429, "history_limit", 1.0)
        buckets = (await asyncio.wait_for(history, 30)).series["temp"]
        assert [b.count for b in buckets] == [10, 10, 10, 10]
        assert [b.count for b in (await asyncio.wait_for(fleet, 30)).series["d1"]] == [40]


async def test_iter_readings_waits_mid_paging_and_goes_on_from_its_position(
    server: str, database_url: str, make_token: Callable[..., str]
) -> None:
    waits: list[tuple[PulseClientError, float]] = []
    async with PulseClient(
        server, make_token("t1"), on_busy=lambda e, s: waits.append((e, s))
    ) as client:
        readings = client.iter_readings("d1", start=T0, end=END, page_size=7)
        first_page = [(await anext(readings)).id for _ in range(7)]

        async def rest() -> list[int]:
            return [reading.id async for reading in readings]

        async with slot_held(server, make_token("t1"), database_url):
            task = asyncio.create_task(rest())  # its next page is refused: the slot is held
            await until(lambda: bool(waits), timeout=20)
            assert not task.done()
        assert first_page + await asyncio.wait_for(task, 30) == list(range(1, 41))
        assert waits[0][0].code == "history_limit"


async def refused_read(
    server: str, database_url: str, make_token: Callable[..., str], busy_wait_s: float
) -> tuple[PulseClientError, list[float]]:
    """A history read while the tenant's one slot is held: the error it ends with, and
    the waits it was told of."""
    waits: list[float] = []
    async with (
        PulseClient(
            server, make_token("t1"), busy_wait_s=busy_wait_s, on_busy=lambda e, s: waits.append(s)
        ) as client,
        slot_held(server, make_token("t1"), database_url),
    ):
        with pytest.raises(PulseClientError) as refused:
            await asyncio.wait_for(client.history("d1", start=T0, end=END), 30)
    return refused.value, waits


async def test_a_read_gives_up_after_busy_wait_s_with_the_refusal(
    server: str, database_url: str, make_token: Callable[..., str]
) -> None:
    refused, waits = await refused_read(server, database_url, make_token, busy_wait_s=2.5)
    assert (refused.status, refused.code) == (429, "history_limit")
    assert waits and all(s == 1.0 for s in waits)
    message = str(refused)
    assert message.startswith("429 history_limit: "), message
    assert f"Gave up after {len(waits) + 1} tries in " in message, message
    assert "(waiting at most 2.5 s)" in message, message


async def test_busy_wait_s_0_raises_the_refusal_at_once(
    server: str, database_url: str, make_token: Callable[..., str]
) -> None:
    refused, waits = await refused_read(server, database_url, make_token, busy_wait_s=0)
    assert refused.code == "history_limit" and "Gave up" not in str(refused)
    assert waits == []
