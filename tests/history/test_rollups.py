"""Rollups: each committed reading counted once into its minute, 15 minutes and hour, by one
process."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from pulse.db.database import Database
from pulse.history import rollups
from pulse.history.params import AGGREGATES, HistoryQuery
from pulse.history.reads import series
from pulse.history.rollups import ROLLUP_LOCK_KEY, Rollups, RollupSettings, roll_up_once
from tests.history.readings import readings_at

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)


async def minutes(pool: asyncpg.Pool, width: int = 1) -> list[tuple]:  # type: ignore[type-arg]
    """The rollups of ``width`` minutes."""
    rows = await pool.fetch(
        """SELECT tenant_id, device_id, metric, bucket, count, min, max, sum, last
             FROM telemetry_rollups WHERE width = $1 ORDER BY 1, 2, 3, 4""",
        width,
    )
    return [tuple(r) for r in rows]


async def test_minutes_quarters_and_hours_count_each_reading_once(pool: asyncpg.Pool) -> None:
    s = timedelta(seconds=1)
    await readings_at(
        pool,
        "t1",
        [
            ("d1", T0 + 5 * s, {"temp": 20.0, "door": True}),
            ("d1", T0 + 50 * s, {"temp": 22.0}),
            ("d1", T0 + 30 * s, {"temp": 30.0, "door": False}),  # later id, earlier time
            ("d1", T0 + 65 * s, {"temp": 10.0}),
            ("d1", T0 + 16 * 60 * s, {"temp": 4.0}),  # the next 15 minutes
            ("d2", T0 + 5 * s, {"temp": 1.0}),
        ],
    )
    await readings_at(pool, "t2", [("d1", T0, {"temp": 99.0})])
    async with pool.acquire() as conn:
        assert await roll_up_once(conn) == 7
        assert await roll_up_once(conn) == 0
    m = T0
    assert await minutes(pool) == [
        ("t1", "d1", "door", m, 2, 0.0, 1.0, 1.0, 0.0),
        ("t1", "d1", "temp", m, 3, 20.0, 30.0, 72.0, 22.0),
        ("t1", "d1", "temp", m + timedelta(minutes=1), 1, 10.0, 10.0, 10.0, 10.0),
        ("t1", "d1", "temp", m + timedelta(minutes=16), 1, 4.0, 4.0, 4.0, 4.0),
        ("t1", "d2", "temp", m, 1, 1.0, 1.0, 1.0, 1.0),
        ("t2", "d1", "temp", m, 1, 99.0, 99.0, 99.0, 99.0),
    ]
    assert await minutes(pool, 15) == [
        ("t1", "d1", "door", m, 2, 0.0, 1.0, 1.0, 0.0),
        ("t1", "d1", "temp", m, 4, 10.0, 30.0, 82.0, 10.0),
        ("t1", "d1", "temp", m + timedelta(minutes=15), 1, 4.0, 4.0, 4.0, 4.0),
        ("t1", "d2", "temp", m, 1, 1.0, 1.0, 1.0, 1.0),
        ("t2", "d1", "temp", m, 1, 99.0, 99.0, 99.0, 99.0),
    ]
    assert await minutes(pool, 60) == [
        ("t1", "d1", "door", m, 2, 0.0, 1.0, 1.0, 0.0),
        ("t1", "d1", "temp", m, 5, 4.0, 30.0, 86.0, 4.0),
        ("t1", "d2", "temp", m, 1, 1.0, 1.0, 1.0, 1.0),
        ("t2", "d1", "temp", m, 1, 99.0, 99.0, 99.0, 99.0),
    ]


async def test_later_rows_merge_into_counted_minutes(pool: asyncpg.Pool) -> None:
    s = timedelta(seconds=1)
    await readings_at(pool, "t1", [("d1", T0 + 10 * s, {"temp": 5.0})])
    async with pool.acquire() as conn:
        await roll_up_once(conn)
        # A reading that arrives late for a minute already counted, older in
        # device time than the minute's last: counted, and "last" stays.
        await readings_at(pool, "t1", [("d1", T0 + 2 * s, {"temp": 7.0})])
        await readings_at(pool, "t1", [("d1", T0 + 40 * s, {"temp": 3.0})])
        assert await roll_up_once(conn) == 2
    assert await minutes(pool) == [("t1", "d1", "temp", T0, 3, 3.0, 7.0, 15.0, 3.0)]
    for width in (15, 60):
        assert await minutes(pool, width) == [("t1", "d1", "temp", T0, 3, 3.0, 7.0, 15.0, 3.0)]


@pytest.mark.parametrize(
    "base",
    [
        T0,
        datetime(1902, 1, 1, tzinfo=UTC),
        datetime(2105, 12, 31, 23, 58, tzinfo=UTC),
        # Past 2^53 microseconds from 1970, where a float8 of them is not exact: the
        # history audit found `last` wrong there.
        datetime(1000, 6, 1, 12, tzinfo=UTC),
        datetime(1, 1, 3, tzinfo=UTC),
        datetime(9999, 12, 30, 23, 58, tzinfo=UTC),
    ],
)
async def test_last_is_the_latest_device_time_to_the_microsecond_then_the_latest_id(
    pool: asyncpg.Pool, db: Database, base: datetime
) -> None:
    us = timedelta(microseconds=1)
    t = base + timedelta(seconds=30, microseconds=123_457)
    query = HistoryQuery(base, base + timedelta(minutes=1), "1m", AGGREGATES, None, 1000, None)

    async def series_lasts() -> list[tuple[str, float]]:
        return [(row[0], row[7]) for row in (await series(db, "t1", ["d1", "d2"], query)).rows]

    await readings_at(
        pool,
        "t1",
        [
            ("d1", t, {"temp": 1.0}),  # one microsecond later than the next, an earlier id
            ("d1", t - us, {"temp": 2.0}),
            ("d2", t, {"temp": 3.0}),  # the same device time: the later id is "last"
            ("d2", t, {"temp": 4.0}),
            ("d2", t - us, {"temp": 5.0}),
        ],
    )
    assert await series_lasts() == [("d1", 1.0), ("d2", 4.0)]  # from the rows
    async with pool.acquire() as conn:
        assert await roll_up_once(conn) == 5
    lasts = await pool.fetch(
        """SELECT device_id, last, last_time FROM telemetry_rollups
            WHERE width = 1 ORDER BY device_id"""
    )
    assert [tuple(r) for r in lasts] == [("d1", 1.0, t), ("d2", 4.0, t)]
    assert await series_lasts() == [("d1", 1.0), ("d2", 4.0)]  # from the rollups


async def test_a_backlog_is_counted_in_steps_that_commit(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rollups, "BATCH_IDS", 7)
    await readings_at(pool, "t1", [("d1", T0, {"v": 1.0})] * 30)
    async with pool.acquire() as conn:
        assert await roll_up_once(conn) == 30
    assert await pool.fetchval("SELECT last_id FROM rollup_watermarks") == 30
    assert (await minutes(pool))[0][4] == 30


async def test_tenants_behind_take_turns_a_batch_each(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the history audit: a pass counted one tenant's whole backlog (1.4 million
    ids after a bulk load) before the next tenant's few rows: every other tenant's
    charts read more raw rows, and slower, until it was done."""
    monkeypatch.setattr(rollups, "BATCH_IDS", 10)
    await readings_at(pool, "big", [("d1", T0, {"v": 1.0})] * 30)
    await readings_at(pool, "small", [("d1", T0, {"v": 1.0})] * 5)
    turns: list[str] = []
    roll_up_tenant = rollups.roll_up_tenant

    async def noted(conn: asyncpg.Connection, tenant_id: str, newest: int) -> int:
        turns.append(tenant_id)
        return await roll_up_tenant(conn, tenant_id, newest)

    monkeypatch.setattr(rollups, "roll_up_tenant", noted)
    async with pool.acquire() as conn:
        assert await roll_up_once(conn) == 35
    # In the tenants' order: small after big's first batch, not after its last.
    assert turns == ["big", "small", "big", "big"], turns


async def test_a_tenant_s_backlog_holds_back_another_s_rollups_by_a_step_at_most(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the hostile audit (M2): 5000 readings of 200 new metric names each were one
    step of the one rollup keeper, 1 M metric values, and another tenant's rollups
    stood still for about 60 s (634 ids behind) until it was done. A tenant's steps
    are sized by what they cost, the tenants behind take turns a step each, and they
    are read again for each round: the quiet tenant's reading committed while the
    other's backlog is being counted is counted before that backlog is done."""
    names = 5  # new names in every reading
    await readings_at(
        pool,
        "a-noisy",
        [("n1", T0, {f"m{i}_{k}": 1.5 for k in range(names)}) for i in range(2000)],
    )
    await readings_at(pool, "b-quiet", [("q1", T0, {"v": 1.0})])
    steps: list[tuple[str, int]] = []  # (tenant, its watermark after the step), in turn
    quiet_counted, quiet_committed = asyncio.Event(), asyncio.Event()
    roll_up_tenant = rollups.roll_up_tenant

    async def noted(conn: asyncpg.Connection, tenant_id: str, newest: int) -> int:
        if steps.count(("b-quiet", 1)) and tenant_id == "a-noisy":
            await quiet_committed.wait()  # the quiet tenant's second reading is in
        upto = await roll_up_tenant(conn, tenant_id, newest)
        steps.append((tenant_id, upto))
        if tenant_id == "b-quiet":
            quiet_counted.set()
        return upto

    monkeypatch.setattr(rollups, "roll_up_tenant", noted)
    async with pool.acquire() as conn:
        counting = asyncio.create_task(roll_up_once(conn))
        async with asyncio.timeout(60):
            await quiet_counted.wait()
        await readings_at(pool, "b-quiet", [("q1", T0, {"v": 2.0})])
        quiet_committed.set()
        async with asyncio.timeout(60):
            assert await counting == 2002
    assert ("b-quiet", 2) in steps, steps
    # Both of the quiet tenant's readings were counted before the other's last step.
    assert steps.index(("b-quiet", 2)) < steps.index(("a-noisy", 2000)), steps
    assert len([t for t, _ in steps if t == "a-noisy"]) > 2, steps
    # And exactly: every value once.
    counts = await pool.fetch(
        """SELECT tenant_id, width, sum(count) AS values FROM telemetry_rollups
            GROUP BY 1, 2 ORDER BY 1, 2"""
    )
    assert [tuple(r) for r in counts] == [("a-noisy", w, 2000 * names) for w in (1, 15, 60)] + [
        ("b-quiet", w, 2) for w in (1, 15, 60)
    ]


async def test_a_pass_ends_while_a_tenant_writes_faster_than_its_steps_count(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the review of bcbb56a: a pass that read the tenants behind again every round
    ended only when a round left none of them short, so a tenant writing faster than its
    steps count (20 ids committed per step of 10) kept it in its rounds for ever, and the
    keeper never trimmed the rollups nor paused. A tenant's rows are counted in the pass
    up to its newest id when it joined the pass; what comes later is the next pass's."""
    monkeypatch.setattr(rollups, "BATCH_IDS", 10)
    await readings_at(pool, "a", [("d1", T0, {"v": 1.0})] * 30)
    roll_up_tenant = rollups.roll_up_tenant
    steps = 0

    async def meanwhile_more(conn: asyncpg.Connection, tenant_id: str, newest: int) -> int:
        nonlocal steps
        steps += 1
        assert steps <= 100, "the pass is still in its rounds after 100 steps"
        upto = await roll_up_tenant(conn, tenant_id, newest)
        await readings_at(pool, "a", [("d1", T0, {"v": 1.0})] * 20)
        return upto

    monkeypatch.setattr(rollups, "roll_up_tenant", meanwhile_more)
    async with pool.acquire() as conn:
        async with asyncio.timeout(60):
            assert await roll_up_once(conn) == 30  # three steps, to its newest id at the start
        assert steps == 3
        monkeypatch.setattr(rollups, "roll_up_tenant", roll_up_tenant)  # the writes stop
        async with asyncio.timeout(60):
            assert await roll_up_once(conn) == 60  # the next pass counts the rest
    # Exactly: every reading once.
    assert (await minutes(pool))[0][4] == 30 + 3 * 20


async def test_a_failed_pass_counts_nothing(pool: asyncpg.Pool) -> None:
    await readings_at(pool, "t1", [("d1", T0, {"v": 1.0})] * 3)
    async with pool.acquire() as conn:
        await conn.execute(
            """CREATE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql
               AS $$ BEGIN RAISE EXCEPTION 'disk full'; END $$;
               CREATE TRIGGER fail BEFORE INSERT ON telemetry_rollups
               FOR EACH ROW WHEN (NEW.width = 60) EXECUTE FUNCTION fail()"""
        )
        with pytest.raises(asyncpg.RaiseError):
            await roll_up_once(conn)
        assert await pool.fetchval("SELECT count(*) FROM telemetry_rollups") == 0
        await conn.execute("DROP TRIGGER fail ON telemetry_rollups")
        assert await roll_up_once(conn) == 3
    assert (await minutes(pool))[0][4] == 3


async def test_sums_past_a_doubles_range_are_infinite_and_stop_nothing(
    pool: asyncpg.Pool,
) -> None:
    """Ingest takes any finite value; a sum past the double's range used to raise
    PostgreSQL's overflow error, which stopped every tenant's rollups."""
    big, minute = 1.5e308, timedelta(minutes=1)
    await readings_at(
        pool,
        "t1",
        [
            ("d1", T0, {"v": big}),  # the same minute, the same pass
            ("d1", T0 + timedelta(seconds=1), {"v": big}),
            ("d2", T0, {"v": -big}),
            ("d2", T0 + timedelta(seconds=1), {"v": -big}),
            ("d3", T0, {"v": big}),  # they cancel out: summed exactly, in numeric
            ("d3", T0 + timedelta(seconds=1), {"v": -big}),
            ("d4", T0, {"v": 1e308}),  # minutes within the range, their hour past it
            ("d4", T0 + minute, {"v": 1e308}),
        ],
    )
    await readings_at(pool, "t2", [("d1", T0, {"v": 1.0})])
    async with pool.acquire() as conn:
        assert await roll_up_once(conn) == 9
        # A later pass adds to a minute counted already (the upsert's sum).
        await readings_at(pool, "t1", [("d5", T0, {"v": big})])
        assert await roll_up_once(conn) == 1
        await readings_at(pool, "t1", [("d5", T0, {"v": big})])
        assert await roll_up_once(conn) == 1
    sums = {
        (r["device_id"], r["width"], r["bucket"]): r["sum"]
        for r in await pool.fetch("SELECT * FROM telemetry_rollups WHERE tenant_id = 't1'")
    }
    inf = float("inf")
    for width in (1, 15, 60):
        assert sums["d1", width, T0] == inf
        assert sums["d2", width, T0] == -inf
        assert sums["d3", width, T0] == 0.0
        assert sums["d5", width, T0] == inf
    assert sums["d4", 1, T0] == sums["d4", 1, T0 + minute] == 1e308
    assert sums["d4", 15, T0] == sums["d4", 60, T0] == inf
    assert await minutes(pool, 60) == [
        ("t1", "d1", "v", T0, 2, big, big, inf, big),
        ("t1", "d2", "v", T0, 2, -big, -big, -inf, -big),
        ("t1", "d3", "v", T0, 2, -big, big, 0.0, -big),
        ("t1", "d4", "v", T0, 2, 1e308, 1e308, inf, 1e308),
        ("t1", "d5", "v", T0, 2, big, big, inf, big),
        ("t2", "d1", "v", T0, 1, 1.0, 1.0, 1.0, 1.0),
    ]


async def test_a_tenant_whose_rows_cannot_be_counted_holds_back_no_other(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    await readings_at(pool, "t1", [("d1", T0, {"v": 1.0})])
    # A row no release of Pulse writes (ingest takes numbers and booleans only).
    await pool.execute("""UPDATE telemetry SET metrics = '{"v": "warm"}' WHERE tenant_id = 't1'""")
    await readings_at(pool, "t2", [("d1", T0, {"v": 2.0})])
    failing: dict[str, float] = {}
    async with pool.acquire() as conn:
        assert await roll_up_once(conn, failing) == 1
        assert list(failing) == ["t1"]
        assert "tenant 't1' after id 0 cannot be counted" in caplog.text
        await readings_at(pool, "t2", [("d1", T0, {"v": 3.0})])
        caplog.clear()
        assert await roll_up_once(conn, failing) == 1  # t1 is left out for a while
        assert "cannot be counted" not in caplog.text
        await pool.execute("""UPDATE telemetry SET metrics = '{"v": 4}' WHERE tenant_id = 't1'""")
        failing["t1"] = 0.0  # its time has come
        assert await roll_up_once(conn, failing) == 1
        assert failing == {}
    assert [(r[0], r[4], r[7]) for r in await minutes(pool)] == [("t1", 1, 4.0), ("t2", 2, 5.0)]


async def wait_for(pool: asyncpg.Pool, query: str, expected: object) -> None:
    deadline = time.monotonic() + 10
    while (got := await pool.fetchval(query)) != expected:
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.02)


async def test_one_process_keeps_the_rollups(pool: asyncpg.Pool, db: Database) -> None:
    fast = RollupSettings(interval_s=0.01)
    first, second = Rollups(db, fast, retry_s=0.01), Rollups(db, fast, retry_s=0.01)
    tasks = [asyncio.create_task(first.run())]
    try:
        await readings_at(pool, "t1", [("d1", T0, {"v": 1.0})] * 5)
        await wait_for(pool, "SELECT last_id FROM rollup_watermarks", 5)
        tasks.append(asyncio.create_task(second.run()))
        async with asyncio.timeout(10):
            while second.asks < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert first.leading and not second.leading
        # The second stands by asking on a pooled connection: only the leader holds one.
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE 'pulse rollups%'"
            )
            == 1
        )
        # The leader goes: the other takes over and goes on from the watermark.
        tasks[0].cancel()
        await asyncio.gather(tasks[0], return_exceptions=True)
        await readings_at(pool, "t1", [("d1", T0, {"v": 1.0})] * 4)
        await wait_for(pool, "SELECT last_id FROM rollup_watermarks", 9)
        assert second.leading
        assert await pool.fetchval("SELECT count FROM telemetry_rollups WHERE width = 1") == 9
        assert await pool.fetchval("SELECT pg_try_advisory_lock($1)", ROLLUP_LOCK_KEY) is False
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_rollups_past_their_window_are_trimmed(pool: asyncpg.Pool) -> None:
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    await readings_at(
        pool,
        "t1",
        [("d1", now - timedelta(days=40), {"v": 1.0}), ("d1", now, {"v": 2.0})],
    )
    async with pool.acquire() as conn:
        await roll_up_once(conn)
        kept = RollupSettings(minutes_days=30, quarters_days=35, hours_days=365)
        assert await rollups.trim(conn, kept) == 2
    assert [r[3] for r in await minutes(pool)] == [now]
    assert len(await minutes(pool, 15)) == 1
    assert len(await minutes(pool, 60)) == 2


async def test_a_long_pass_is_followed_by_a_longer_pause(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next pass waits DUTY times as long as the last one took, when that is longer
    than the interval: the rollups' share of their connection stays bounded."""
    passes: list[tuple[float, float]] = []
    counted = rollups.roll_up_once

    async def slow_pass(
        conn: asyncpg.Connection, failing: dict[str, float], steps: dict[str, int]
    ) -> int:
        started = time.monotonic()
        try:
            await asyncio.sleep(0.05)  # a pass that takes 50 ms at least
            return await counted(conn, failing, steps)
        finally:
            passes.append((started, time.monotonic()))

    monkeypatch.setattr(rollups, "roll_up_once", slow_pass)
    task = asyncio.create_task(Rollups(db, RollupSettings(interval_s=0.001), retry_s=0.01).run())
    try:
        async with asyncio.timeout(10):
            while len(passes) < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for (start, end), (following, _) in itertools.pairwise(passes):
        # Far longer than the interval of 1 ms; asyncio may wake a timer a tick early.
        assert following - end >= 3 * (end - start) - 0.005


def test_the_pause_after_a_backlog_is_bounded() -> None:
    assert rollups.pause_after(0.0, 0.5) == 0.5
    assert rollups.pause_after(0.5, 0.5) == 2.0
    # A pass over a backlog of minutes: the next one comes within seconds.
    assert rollups.pause_after(120.0, 0.5) == rollups.MAX_PAUSE_S <= 5.0


def test_a_tenant_s_steps_are_sized_by_what_they_cost() -> None:
    step = rollups.STEP_S
    assert rollups.next_step(100, 100, step / 4) == 200  # a quick full step: doubled
    assert rollups.next_step(100, 40, step / 4) == 100  # it was not full: no news
    assert rollups.next_step(100, 100, step * 4) == 25  # 4x too long: a quarter
    assert rollups.next_step(1, 1, 60.0) == 1  # at least one id
    top = rollups.BATCH_IDS
    assert rollups.next_step(top, top, 0.0) == top
