"""One NOTIFY per insert statement and tenant, carrying the id range."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import pytest

from pulse.ingest.model import Accepted, Submission
from pulse.ingest.validation import Reading
from pulse.ingest.writer import TelemetryWriter
from tests.support import provision_device, seam


class Listener:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.notes: dict[str, asyncio.Queue[dict[str, Any]]] = {}

    async def listen(self, tenant: str) -> None:
        channel = await self.conn.fetchval("SELECT pulse_channel($1)", tenant)
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.notes[tenant] = queue

        def received(_c: object, _pid: int, _ch: str, payload: str) -> None:
            # The channel also carries device status changes (a device seen for
            # the first time comes ONLINE); these tests are about telemetry.
            message = orjson.loads(payload)
            if message["kind"] == "telemetry":
                queue.put_nowait(message)

        await self.conn.add_listener(channel, received)

    async def next(self, tenant: str) -> dict[str, Any]:
        return await asyncio.wait_for(self.notes[tenant].get(), 5)


@pytest.fixture
async def listener(database_url: str) -> AsyncIterator[Listener]:
    conn = await asyncpg.connect(database_url)
    try:
        yield Listener(conn)
    finally:
        await conn.close()


def submissions(tenant: str, device: str, token: str, n: int) -> list[Submission]:
    now = datetime.now(UTC)
    return [Submission(tenant, device, token, Reading(now, {"i": i}, i)) for i in range(n)]


async def test_a_batch_of_50_rows_is_one_notification(
    pool: asyncpg.Pool, listener: Listener
) -> None:
    token = await provision_device(pool, "t1", "dev-1")
    await listener.listen("t1")
    writer = TelemetryWriter(seam(pool))
    outcomes = await writer.write(submissions("t1", "dev-1", token, 50))
    assert outcomes == [Accepted(i) for i in range(1, 51)]
    assert await listener.next("t1") == {
        "kind": "telemetry",
        "tenant": "t1",
        "first": 1,
        "last": 50,
    }
    # Notifications arrive in commit order, so if the 50 rows had produced more
    # than one, the next one would not be this write's.
    await writer.write(submissions("t1", "dev-1", token, 1))
    assert await listener.next("t1") == {
        "kind": "telemetry",
        "tenant": "t1",
        "first": 51,
        "last": 51,
    }


async def test_a_batch_spanning_tenants_notifies_each_tenant_once(
    pool: asyncpg.Pool, listener: Listener
) -> None:
    token_1 = await provision_device(pool, "t1", "dev-1")
    token_2 = await provision_device(pool, "t2", "dev-1")
    await listener.listen("t1")
    await listener.listen("t2")
    writer = TelemetryWriter(seam(pool))
    batch = submissions("t2", "dev-1", token_2, 3) + submissions("t1", "dev-1", token_1, 4)
    await writer.write(batch)
    assert await listener.next("t1") == {"kind": "telemetry", "tenant": "t1", "first": 1, "last": 4}
    assert await listener.next("t2") == {"kind": "telemetry", "tenant": "t2", "first": 1, "last": 3}
    assert listener.notes["t1"].empty()
    assert listener.notes["t2"].empty()


async def test_heartbeats_and_rejections_notify_nothing(
    pool: asyncpg.Pool, listener: Listener
) -> None:
    token = await provision_device(pool, "t1", "dev-1")
    await listener.listen("t1")
    writer = TelemetryWriter(seam(pool))
    await writer.write([Submission("t1", "dev-1", token, None)])
    await writer.write(submissions("t1", "dev-1", "pdt_wrong", 3))
    await writer.write(submissions("t1", "dev-1", token, 1))
    assert await listener.next("t1") == {"kind": "telemetry", "tenant": "t1", "first": 1, "last": 1}
