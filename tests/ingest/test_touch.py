"""A write marks its devices seen: not again within the precision, always when the status moved."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from pulse.fleet.sweeper import sweep_statuses
from pulse.ingest.model import Submission
from pulse.ingest.validation import Reading
from pulse.ingest.writer import TelemetryWriter, Written
from tests.support import provision_device, seam

NOW = datetime(2026, 11, 27, 17, 0, tzinfo=UTC)


def reading(value: float) -> Reading:
    return Reading(NOW, {"v": value}, None)


async def row_version(pool: asyncpg.Pool, device_id: str = "dev-1") -> asyncpg.Record:
    """The device row's version (xmin) with what the touch writes."""
    row = await pool.fetchrow(
        "SELECT xmin::text AS version, status, last_seen_at FROM devices WHERE device_id = $1",
        device_id,
    )
    assert row is not None
    return row


class CameOnline:
    def __init__(self) -> None:
        self.writes: list[list[tuple[str, str]]] = []

    async def __call__(self, conn: asyncpg.Connection, written: Written) -> None:
        self.writes.append(written.came_online)


async def test_a_device_seen_within_the_precision_is_not_written_again(
    pool: asyncpg.Pool, token: str
) -> None:
    writer = TelemetryWriter(seam(pool), seen_precision_s=60)
    await writer.write([Submission("t1", "dev-1", token, reading(1))])
    first = await row_version(pool)
    assert first["status"] == "ONLINE" and first["last_seen_at"] is not None
    for value in (2, 3):  # a reading, then a reading and a heartbeat
        await writer.write([Submission("t1", "dev-1", token, reading(value))])
    await writer.write([Submission("t1", "dev-1", token, None)])
    assert await row_version(pool) == first  # the same row version: not locked, not written


async def test_a_device_seen_longer_ago_is_marked_seen_again(
    pool: asyncpg.Pool, token: str
) -> None:
    other = await provision_device(pool, "t1", "dev-2")
    writer = TelemetryWriter(seam(pool), seen_precision_s=1.0)
    await writer.write(
        [Submission("t1", "dev-1", token, reading(1)), Submission("t1", "dev-2", other, None)]
    )
    # dev-1 was last marked seen two seconds ago; dev-2 just now.
    await pool.execute(
        "UPDATE devices SET last_seen_at = now() - interval '2 s' WHERE device_id = 'dev-1'"
    )
    before = await row_version(pool, "dev-1"), await row_version(pool, "dev-2")
    await writer.write(
        [Submission("t1", "dev-1", token, reading(2)), Submission("t1", "dev-2", other, reading(3))]
    )
    after = await row_version(pool, "dev-1"), await row_version(pool, "dev-2")
    assert after[0]["last_seen_at"] - before[0]["last_seen_at"] >= timedelta(seconds=1.9)
    assert after[1] == before[1]


async def test_precision_zero_marks_every_write(pool: asyncpg.Pool, token: str) -> None:
    writer = TelemetryWriter(seam(pool), seen_precision_s=0)
    await writer.write([Submission("t1", "dev-1", token, reading(1))])
    first = await row_version(pool)
    await writer.write([Submission("t1", "dev-1", token, reading(2))])
    second = await row_version(pool)
    assert second["version"] != first["version"]
    assert second["last_seen_at"] >= first["last_seen_at"]


async def test_a_device_the_sweeper_moved_comes_online_with_its_next_message(
    pool: asyncpg.Pool, token: str
) -> None:
    """However recently it was marked seen: the status is read from the row, not assumed."""
    came_online = CameOnline()
    writer = TelemetryWriter(seam(pool), hooks=[came_online], seen_precision_s=3600)
    await writer.write([Submission("t1", "dev-1", token, reading(1))])
    async with pool.acquire() as conn:  # the sweeper's clock a minute ahead
        swept = await sweep_statuses(
            conn,
            stale_after_s=30,
            offline_after_s=300,
            now=datetime.now(UTC) + timedelta(minutes=1),
        )
    assert swept.stale == 1
    assert (await row_version(pool))["status"] == "STALE"
    await writer.write([Submission("t1", "dev-1", token, reading(2))])
    assert (await row_version(pool))["status"] == "ONLINE"
    await writer.write([Submission("t1", "dev-1", token, reading(3))])
    assert came_online.writes == [[("t1", "dev-1")], [("t1", "dev-1")], []]
