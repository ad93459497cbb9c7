"""Migration 0009: the minutes and hours of 0007 move into one table, and the 15 minutes
are made from the minutes, nothing lost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from pulse.db.migrate import discover, migrate

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
COLUMNS = "tenant_id, device_id, metric, bucket, count, min, max, sum, last, last_time, last_id"


async def test_minutes_and_hours_move_and_quarters_are_made(conn: asyncpg.Connection) -> None:
    await migrate(conn, [m for m in discover() if m.version < 9])
    minute = timedelta(minutes=1)
    # (minute, count, min, max, sum, last, last time, last id) of t1/d1/temp: minutes 0
    # and 14 make the first 15 minutes, whose last is minute 14's; minute 20 the next.
    rows = [
        (0, 2, 1.0, 5.0, 6.0, 5.0, 10, 2),
        (14, 1, 9.0, 9.0, 9.0, 9.0, 30, 9),
        (20, 3, -1.0, 2.0, 3.0, -1.0, 50, 7),
    ]
    for m, count, low, high, total, last, seconds, last_id in rows:
        bucket = T0 + m * minute
        await conn.execute(
            f"INSERT INTO telemetry_minutes ({COLUMNS}) "
            "VALUES ('t1', 'd1', 'temp', $1, $2, $3, $4, $5, $6, $7, $8)",
            bucket, count, low, high, total, last, bucket + timedelta(seconds=seconds), last_id,
        )  # fmt: skip
    # An hour whose minutes are trimmed already: it moves, with no 15 minutes.
    old = T0 - timedelta(days=60)
    for bucket, count in ((T0, 6), (old, 4)):
        await conn.execute(
            f"INSERT INTO telemetry_hours ({COLUMNS}) "
            "VALUES ('t1', 'd1', 'temp', $1, $2, -1, 9, 18, -1, $1, 7)",
            bucket, count,
        )  # fmt: skip

    await migrate(conn)

    got = await conn.fetch(
        """SELECT width, bucket, count, min, max, sum, last, last_id FROM telemetry_rollups
            WHERE tenant_id = 't1' AND device_id = 'd1' AND metric = 'temp'
            ORDER BY width, bucket"""
    )
    assert [tuple(r) for r in got] == [
        (1, T0, 2, 1.0, 5.0, 6.0, 5.0, 2),
        (1, T0 + 14 * minute, 1, 9.0, 9.0, 9.0, 9.0, 9),
        (1, T0 + 20 * minute, 3, -1.0, 2.0, 3.0, -1.0, 7),
        (15, T0, 3, 1.0, 9.0, 15.0, 9.0, 9),
        (15, T0 + 15 * minute, 3, -1.0, 2.0, 3.0, -1.0, 7),
        (60, old, 4, -1.0, 9.0, 18.0, -1.0, 7),
        (60, T0, 6, -1.0, 9.0, 18.0, -1.0, 7),
    ]
    gone = await conn.fetchval(
        "SELECT count(*) FROM pg_class WHERE relname IN ('telemetry_minutes', 'telemetry_hours')"
    )
    assert gone == 0
