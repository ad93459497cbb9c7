"""TelemetryWriter against a real database: outcomes, the hook seam, rollbacks."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime

import asyncpg
import pytest

from pulse.db.errors import DatabaseUnavailable
from pulse.db.pool import create_pool
from pulse.errors import RATE_LIMITED
from pulse.ingest.model import Accepted, Device, Rejected, Submission
from pulse.ingest.validation import Reading
from pulse.ingest.writer import TelemetryWriter, TenantRows, Written
from tests.ingest.conftest import stored_rows
from tests.support import provision_device, seam

NOW = datetime(2026, 11, 27, 17, 0, tzinfo=UTC)


def reading(value: float) -> Reading:
    return Reading(NOW, {"v": value}, None)


async def test_outcomes_line_up_with_submissions(pool: asyncpg.Pool, token: str) -> None:
    writer = TelemetryWriter(seam(pool))
    assert await writer.write([]) == []
    outcomes = await writer.write(
        [
            Submission("t1", "dev-1", token, reading(1)),
            Submission("t1", "dev-1", "pdt_wrong", reading(2)),
            Submission("t1", "nope", token, reading(3)),
            Submission("t1", "dev-1", token, None),
            Submission("t1", "dev-1", token, reading(4)),
        ]
    )
    assert [type(o) for o in outcomes] == [Accepted, Rejected, Rejected, Accepted, Accepted]
    assert outcomes[0] == Accepted(1)
    assert outcomes[1].reason.code == "invalid_device_token"  # type: ignore[union-attr]
    assert outcomes[2].reason.code == "unknown_device"  # type: ignore[union-attr]
    assert outcomes[3] == Accepted(None)
    assert outcomes[4] == Accepted(2)
    assert await stored_rows(pool) == 2


@pytest.mark.parametrize("copies", [1, 40], ids=["checked-in-transaction", "checked-ahead"])
async def test_tokens_are_checked_against_their_own_tenants_device(
    pool: asyncpg.Pool, token: str, copies: int
) -> None:
    """One check serves a write that spans tenants, whose devices share ids: each
    message is judged against the device of its own tenant, whatever their order.
    (40 copies: large enough to be checked before queueing, ``CHECK_AHEAD_FROM``.)"""
    t2_dev_1 = await provision_device(pool, "t2", "dev-1")
    t2_dev_2 = await provision_device(pool, "t2", "dev-2")
    t3_dev_3 = await provision_device(pool, "t3", "dev-3")
    messages = [
        (Submission("t2", "dev-2", t2_dev_2, reading(1)), True),
        (Submission("t1", "dev-1", t2_dev_1, reading(2)), False),  # t2's dev-1 token
        (Submission("t3", "dev-3", t3_dev_3, reading(3)), True),
        (Submission("t2", "dev-1", token, reading(4)), False),  # t1's dev-1 token
        (Submission("t1", "dev-1", token, reading(5)), True),
        (Submission("t3", "dev-1", token, reading(6)), False),  # t3 has no dev-1
        (Submission("t2", "dev-1", t2_dev_1, reading(7)), True),
    ] * copies
    outcomes = await TelemetryWriter(seam(pool)).write([m for m, _ in messages])
    assert [isinstance(o, Accepted) for o in outcomes] == [ok for _, ok in messages]
    refused = [o.reason.code for o in outcomes if isinstance(o, Rejected)][:3]
    assert refused == ["invalid_device_token", "invalid_device_token", "unknown_device"]
    assert await stored_rows(pool) == 4 * copies


async def test_hooks_see_the_write_inside_the_transaction(pool: asyncpg.Pool, token: str) -> None:
    await pool.execute("UPDATE devices SET status = 'STALE'")
    other = await provision_device(pool, "t1", "dev-2")
    seen: list[tuple[Written, int]] = []

    async def hook(conn: asyncpg.Connection, written: Written) -> None:
        # The rows are visible to the hook's connection, not yet to others.
        inside = await conn.fetchval("SELECT count(*) FROM telemetry")
        seen.append((written, inside))

    writer = TelemetryWriter(seam(pool), hooks=[hook])
    await writer.write(
        [Submission("t1", "dev-1", token, reading(1)), Submission("t1", "dev-2", other, None)]
    )
    written, inside = seen[0]
    assert written.rows == {"t1": TenantRows(1, [reading(1)])}
    assert written.reading("t1", 1) == reading(1)
    assert written.seen == [("t1", "dev-1"), ("t1", "dev-2")]
    assert sorted(written.came_online) == [("t1", "dev-1"), ("t1", "dev-2")]
    assert inside == 1
    await writer.write([Submission("t1", "dev-1", token, reading(2))])
    assert seen[1][0].came_online == []


async def test_a_failing_hook_rolls_everything_back(pool: asyncpg.Pool, token: str) -> None:
    async def broken_rule(conn: asyncpg.Connection, written: Written) -> None:
        raise RuntimeError("rule failed")

    writer = TelemetryWriter(seam(pool), hooks=[broken_rule])
    with pytest.raises(RuntimeError):
        await writer.write([Submission("t1", "dev-1", token, reading(1))])
    assert await stored_rows(pool) == 0
    assert await pool.fetchval("SELECT last_event_id FROM tenants") == 0
    assert await pool.fetchval("SELECT last_seen_at FROM devices") is None


async def test_admission_is_asked_only_for_authenticated_messages(
    pool: asyncpg.Pool, token: str
) -> None:
    asked: list[tuple[str, str]] = []

    def admit(counts: Mapping[Device, int]) -> dict[Device, tuple[int, Rejected]]:
        for device, count in counts.items():
            asked.extend([device] * count)
        return {
            device: (1, Rejected(RATE_LIMITED, "slow down", retry_after_s=2.5)) for device in counts
        }

    writer = TelemetryWriter(seam(pool), admit=admit)
    outcomes = await writer.write(
        [
            Submission("t1", "dev-1", "pdt_wrong", reading(0)),
            Submission("t1", "dev-1", token, reading(1)),
            Submission("t1", "dev-1", token, reading(2)),
        ]
    )
    assert asked == [("t1", "dev-1"), ("t1", "dev-1")]
    assert outcomes[1] == Accepted(1)
    assert isinstance(outcomes[2], Rejected)
    assert (outcomes[2].reason.code, outcomes[2].retry_after_s) == ("rate_limited", 2.5)
    assert await stored_rows(pool) == 1


async def test_heartbeat_reserves_no_id(pool: asyncpg.Pool, token: str) -> None:
    writer = TelemetryWriter(seam(pool))
    assert await writer.write([Submission("t1", "dev-1", token, None)]) == [Accepted(None)]
    assert await pool.fetchval("SELECT last_event_id FROM tenants") == 0
    assert await pool.fetchval("SELECT status FROM devices") == "ONLINE"


async def test_database_unreachable(database_url: str, token: str) -> None:
    pool = await create_pool(database_url, max_size=1)
    writer = TelemetryWriter(seam(pool))
    await pool.close()
    with pytest.raises(DatabaseUnavailable):
        await writer.write([Submission("t1", "dev-1", token, reading(1))])


@pytest.mark.parametrize("fillers", [0, 40])  # 40: large enough to be checked ahead
async def test_a_stored_broker_reading_refused_for_the_rate_is_a_duplicate(
    pool: asyncpg.Pool, token: str, fillers: int
) -> None:
    """A second delivery of a stored reading (its seq claimed) is a duplicate even when
    the device's bucket is empty; another reading over the limit is rate_limited."""

    def broker(seq: int) -> Submission:
        return Submission("t1", "dev-1", "", Reading(NOW, {"v": seq}, seq), broker=True)

    assert await TelemetryWriter(seam(pool)).write([broker(7)]) == [Accepted(1)]

    def nothing_left(counts: Mapping[Device, int]) -> dict[Device, tuple[int, Rejected]]:
        return {device: (0, Rejected(RATE_LIMITED, "slow down", 1.0)) for device in counts}

    writer = TelemetryWriter(seam(pool), admit=nothing_left)
    extra = [broker(100 + i) for i in range(fillers)]
    outcomes = await writer.write([broker(7), broker(8), *extra])
    assert outcomes[0] == Accepted(None, duplicate=True)
    assert all(isinstance(o, Rejected) and o.reason is RATE_LIMITED for o in outcomes[1:])
    assert await stored_rows(pool) == 1


@pytest.mark.parametrize("first_commits", [True, False], ids=["committed", "rolled-back"])
async def test_a_delivery_over_the_rate_waits_for_the_first_delivery_in_flight(
    pool: asyncpg.Pool, token: str, first_commits: bool
) -> None:
    """The broker may deliver a reading again before the first delivery's write has
    committed. Refused for the rate, the second delivery waits for the first's outcome:
    a duplicate if it commits, rate_limited if it rolls back (it failed CI once, when a
    second delivery found the first one's claim not yet committed)."""

    def nothing_left(counts: Mapping[Device, int]) -> dict[Device, tuple[int, Rejected]]:
        return {device: (0, Rejected(RATE_LIMITED, "slow down", 1.0)) for device in counts}

    writer = TelemetryWriter(seam(pool), admit=nothing_left)
    again = Submission("t1", "dev-1", "", Reading(NOW, {"v": 7}, 7), broker=True)
    async with pool.acquire() as first:
        in_flight = first.transaction()
        await in_flight.start()
        await first.execute(
            "INSERT INTO broker_seqs (tenant_id, device_id, seq) VALUES ('t1', 'dev-1', 7)"
        )
        second = asyncio.create_task(writer.write([again]))

        async def waits() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            )

        async with asyncio.timeout(10):
            while not (second.done() or await waits()):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await (in_flight.commit() if first_commits else in_flight.rollback())
    outcome = (await second)[0]
    if first_commits:
        assert outcome == Accepted(None, duplicate=True)
    else:
        assert isinstance(outcome, Rejected) and outcome.reason is RATE_LIMITED
    assert await pool.fetchval("SELECT count(*) FROM broker_seqs") == int(first_commits)
