"""Telemetry lives in daily partitions: days ahead are created, days past the window are
dropped whole; a resume from a dropped position is told so.

Each test keeps one "today" from start to end (the ``today`` fixture), so that a run
across UTC midnight names the same partitions as the code under test."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from pulse.db import retention
from pulse.db.retention import (
    DAYS_AHEAD,
    RETENTION_LOCK_KEY,
    create_partitions,
    drop_expired,
    ensure_partitions,
    utc_today,
)
from tests.streams.ws_support import open_ws, recv
from tests.support import insert_readings, provision_device, running_server, seam, sse_events

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"


@pytest.fixture(autouse=True)
def today(monkeypatch: pytest.MonkeyPatch) -> date:
    """The day the test started, for the test and for pulse.db.retention alike."""
    day = retention.utc_today()
    monkeypatch.setattr(retention, "utc_today", lambda: day)
    return day


async def age(pool: asyncpg.Pool, ids: list[int], days: int) -> None:
    """Move rows to the day ``days`` before today (its partition is created first)."""
    day = retention.utc_today() - timedelta(days=days)
    await create_partitions(seam(pool), day, day)
    await pool.execute(
        "UPDATE telemetry SET received_at = $2 WHERE id = ANY($1)",
        ids,
        datetime(day.year, day.month, day.day, 12, tzinfo=UTC),
    )


async def partitions(pool: asyncpg.Pool) -> list[str]:
    rows = await pool.fetch(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = 'telemetry'::regclass ORDER BY c.relname"""
    )
    return [r["relname"] for r in rows]


def name(days_from_today: int) -> str:
    return f"telemetry_p{retention.utc_today() + timedelta(days=days_from_today):%Y%m%d}"


async def test_days_ahead_exist_and_take_rows(pool: asyncpg.Pool) -> None:
    await ensure_partitions(seam(pool))
    assert set(await partitions(pool)) >= {name(d) for d in range(DAYS_AHEAD + 1)}
    [first] = await insert_readings(pool, "t1", [("d1", {"v": 1})])
    ahead = retention.utc_today() + timedelta(days=DAYS_AHEAD)
    await pool.execute(
        "UPDATE telemetry SET received_at = $1 WHERE id = $2",
        datetime(ahead.year, ahead.month, ahead.day, 23, tzinfo=UTC),
        first,
    )
    assert await pool.fetchval(f"SELECT count(*) FROM {name(DAYS_AHEAD)}") == 1
    assert await ensure_partitions(seam(pool)) == 0


async def test_expired_days_are_dropped_whole(pool: asyncpg.Pool) -> None:
    old = await insert_readings(pool, "t1", [("d1", {"v": i}) for i in range(120)])
    kept = await insert_readings(pool, "t1", [("d1", {"v": i}) for i in range(30)])
    await age(pool, old[:60], days=9)
    await age(pool, old[60:], days=8)
    await age(pool, kept[:10], days=6)
    cutoff = datetime.now(UTC) - timedelta(hours=168)
    assert await drop_expired(seam(pool), cutoff) == [name(-9), name(-8)]
    remaining = [r["id"] for r in await pool.fetch("SELECT id FROM telemetry ORDER BY id")]
    assert remaining == kept
    assert name(-6) in await partitions(pool)
    assert await drop_expired(seam(pool), cutoff) == []


async def test_one_process_drops_at_a_time(pool: asyncpg.Pool) -> None:
    old = await insert_readings(pool, "t1", [("d1", {"v": 1})] * 10)
    await age(pool, old, days=9)
    cutoff = datetime.now(UTC) - timedelta(hours=168)
    async with pool.acquire() as other, other.transaction():
        # Another process holds this turn: this one skips it.
        assert await other.fetchval("SELECT pg_try_advisory_xact_lock($1)", RETENTION_LOCK_KEY)
        assert await drop_expired(seam(pool), cutoff) == []
    assert await drop_expired(seam(pool), cutoff) == [name(-9)]
    assert await pool.fetchval("SELECT count(*) FROM telemetry") == 0


async def test_interrupted_detach_is_finalized(pool: asyncpg.Pool) -> None:
    old = await insert_readings(pool, "t1", [("d1", {"v": 1})] * 3)
    await age(pool, old, days=9)
    blocker = await pool.acquire()
    try:
        # A DETACH CONCURRENTLY cancelled while it waits for a reader leaves the
        # partition "detach pending".
        await blocker.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await blocker.fetchval("SELECT count(*) FROM telemetry")
        detach = asyncio.create_task(
            pool.execute(f"ALTER TABLE telemetry DETACH PARTITION {name(-9)} CONCURRENTLY")
        )
        deadline = time.monotonic() + 10
        while not await pool.fetchval(
            "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = $1::regclass", name(-9)
        ):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        detach.cancel()
        await asyncio.gather(detach, return_exceptions=True)
        await blocker.execute("ROLLBACK")
    finally:
        await pool.release(blocker)
    cutoff = datetime.now(UTC) - timedelta(hours=168)
    assert await drop_expired(seam(pool), cutoff) == [name(-9)]
    assert await pool.fetchval("SELECT to_regclass($1)", name(-9)) is None


async def test_resume_from_dropped_history(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    old = await insert_readings(pool, "t1", [("d1", {"v": i}) for i in range(5)])
    await insert_readings(pool, "t1", [("d1", {"v": i}) for i in range(3)])
    await age(pool, old, days=2)
    # The server's own retention task, with a one-day window.
    fast = dataclasses.replace(settings, retention_hours=24.0, retention_interval_s=0.05)
    async with running_server(fast) as url:
        deadline = time.monotonic() + 10
        while await pool.fetchval("SELECT count(*) FROM telemetry") != 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as http,
            http.stream(
                "GET",
                SSE_PATH,
                headers={"Authorization": f"Bearer {make_token('t1')}", "Last-Event-ID": "2"},
            ) as r,
        ):
            got = []
            async for event in sse_events(r):
                got.append((event.event, event.id, event.data))
                if event.id == "8":
                    break
    assert got[0] == ("reset", None, '{"reason":"history_trimmed","earliest_id":6}')
    assert [i for _, i, _ in got[1:]] == ["6", "7", "8"]


async def test_resume_when_every_row_was_dropped(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """A tenant that wrote nothing for longer than the window has no rows left: a client
    resuming before its newest id is told what it lost, over SSE and the WebSocket."""
    old = await insert_readings(pool, "t1", [("d1", {"v": i}) for i in range(5)])
    await age(pool, old, days=2)
    fast = dataclasses.replace(settings, retention_hours=24.0, retention_interval_s=0.05)
    trimmed = {"reason": "history_trimmed", "earliest_id": 6}
    token = make_token("t1")
    async with running_server(fast) as url:
        deadline = time.monotonic() + 10
        while await pool.fetchval("SELECT count(*) FROM telemetry") != 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as http,
            http.stream(
                "GET",
                SSE_PATH,
                headers={"Authorization": f"Bearer {token}", "Last-Event-ID": "2"},
            ) as r,
            open_ws(url, token=token, last_event_id=2) as ws,
        ):
            assert (await recv(ws))["type"] == "connected"
            assert await recv(ws) == {"type": "reset", **trimmed}
            await insert_readings(pool, "t1", [("d1", {"v": 9})])
            assert (await recv(ws))["id"] == 6
            got = []
            async for event in sse_events(r):
                got.append((event.event, event.id))
                if event.id == "6":
                    break
                if event.event == "reset":
                    assert json.loads(event.data) == trimmed
    assert [(name == "reset", i) for name, i in got] == [(True, None), (False, "6")]


async def test_processes_starting_together_create_each_day_once(pool: asyncpg.Pool) -> None:
    far = retention.utc_today() + timedelta(days=30)
    created = await asyncio.gather(
        *(create_partitions(seam(pool), far, far + timedelta(days=2)) for _ in range(4))
    )
    assert sorted(created) == [0, 0, 0, 3]


async def test_a_missing_day_is_a_503_and_made_again_at_once(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    """From the time audit: with today's partition dropped by hand, ingest answered an
    undocumented 500 internal_error until the next retention pass (a minute by default).
    Now a 503 database_unavailable with Retry-After, and the day is made again within a
    second or two of that write, not at the next pass."""
    token = await provision_device(pool, "t1", "d1")
    today = f"telemetry_p{utc_today():%Y%m%d}"
    async with running_server(settings) as url, httpx.AsyncClient(base_url=url) as http:
        await pool.execute(f'ALTER TABLE telemetry DETACH PARTITION "{today}"')
        await pool.execute(f'DROP TABLE "{today}"')

        async def post() -> httpx.Response:
            return await http.post(
                "/ingest/v1/tenant/t1/device/d1/telemetry",
                json={"metrics": {"v": 1}},
                headers={"X-Provision-Token": token},
            )

        refused = await post()
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "database_unavailable"
        assert refused.headers["Retry-After"]
        async with asyncio.timeout(15):  # retention_interval_s is a minute here
            while (response := await post()).status_code != 201:
                assert response.status_code == 503, response.text
                await asyncio.sleep(0.1)
    assert settings.retention_interval_s >= 60


async def test_alerts_closed_before_the_cutoff_are_deleted_and_no_others(
    pool: asyncpg.Pool,
) -> None:
    """From the soak audit: nothing ever deleted an alert, and a flapping sensor raises
    one at each breach: 15,000 closed alerts an hour beside about 20 active ones. Alerts
    closed before the cutoff go, a batch at a time; active ones and newer ones stay."""
    now = datetime.now(UTC)
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1') ON CONFLICT DO NOTHING")
    insert = """INSERT INTO alerts (tenant_id, device_id, alert_type, severity, status,
                                    summary, closed_at, closed_reason, created_at)
                VALUES ('t1', $1, 'NO_HEARTBEAT', 2, $2, 'x', $3, $4, $5)"""
    for i in range(7):  # closed long ago
        days = timedelta(days=100 + i)
        await pool.execute(insert, f"old-{i}", "CLOSED", now - days, "recovered", now - days)
    await pool.execute(insert, "recent", "CLOSED", now - timedelta(days=1), "manual", now)
    old = now - timedelta(days=200)
    await pool.execute(insert, "active", "OPEN", None, None, old)  # open since long ago
    await pool.execute(insert, "acked", "ACKNOWLEDGED", None, None, old)
    cutoff = now - timedelta(days=90)
    assert await retention.delete_closed_alerts(seam(pool), cutoff, batch=3) == 7
    left = await pool.fetch("SELECT device_id FROM alerts ORDER BY device_id")
    assert [r["device_id"] for r in left] == ["acked", "active", "recent"]
    assert await retention.delete_closed_alerts(seam(pool), cutoff, batch=3) == 0
    # Another process's turn: this one deletes nothing.
    holder = await pool.acquire()
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", RETENTION_LOCK_KEY)
        await pool.execute(insert, "old-again", "CLOSED", now - timedelta(days=99), "manual", now)
        assert await retention.delete_closed_alerts(seam(pool), cutoff) == 0
        await holder.fetchval("SELECT pg_advisory_unlock($1)", RETENTION_LOCK_KEY)
    finally:
        await pool.release(holder)
    assert await retention.delete_closed_alerts(seam(pool), cutoff) == 1


async def test_the_server_deletes_alerts_closed_past_their_retention(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    now = datetime.now(UTC)
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1') ON CONFLICT DO NOTHING")
    await pool.execute(
        """INSERT INTO alerts (tenant_id, device_id, alert_type, severity, status, summary,
                               closed_at, closed_reason)
           VALUES ('t1', 'd1', 'NO_HEARTBEAT', 2, 'CLOSED', 'x', $1, 'recovered'),
                  ('t1', 'd2', 'NO_HEARTBEAT', 2, 'CLOSED', 'x', $2, 'recovered')""",
        now - timedelta(days=31),
        now - timedelta(days=29),
    )
    kept = dataclasses.replace(settings, alert_retention_days=30, retention_interval_s=0.2)
    async with running_server(kept):
        async with asyncio.timeout(20):
            while await pool.fetchval("SELECT count(*) FROM alerts") != 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    assert await pool.fetchval("SELECT device_id FROM alerts") == "d2"


@pytest.mark.parametrize(
    ("hours", "alert_days"),
    [(99_999_999, 90), (168, 1_000_000), (1e300, 1e300)],
    ids=["telemetry-for-ever", "alerts-for-ever", "both-1e300"],
)
async def test_a_window_meant_as_for_ever_still_makes_the_days_ahead(
    pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture, hours: float, alert_days: float
) -> None:
    """From the operations audit: PULSE_RETENTION_HOURS=99999999 (11,400 years) made
    every pass fail with `OverflowError: date value out of range` before it created any
    partition: a day dropped by hand (or a process down for days) was never made again,
    and ingest answered 503 while /readyz said 200. PULSE_ALERT_RETENTION_DAYS=1000000
    was a traceback a pass. A window reaching before year 1 now drops nothing, and the
    days ahead are made first whatever the other steps do."""
    await ensure_partitions(seam(pool))
    missing = name(2)
    await pool.execute(f'ALTER TABLE telemetry DETACH PARTITION "{missing}"')
    await pool.execute(f'DROP TABLE "{missing}"')
    old = await insert_readings(pool, "t1", [("d1", {"v": 1})])
    await age(pool, old, days=9)
    task = asyncio.create_task(
        retention.run_retention(seam(pool), hours, 3600, alert_retention_days=alert_days)
    )
    try:
        async with asyncio.timeout(10):
            while missing not in await partitions(pool):
                assert not task.done(), task
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # the rest of the pass
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Nothing is older than "for ever"; a week's window drops that day as before.
    assert (name(-9) in await partitions(pool)) == (hours > 168)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_failing_step_does_not_stop_the_others(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A step that fails for a reason that lasts (here the drop) is logged, once with its
    traceback, and the pass goes on: the days ahead are made at every pass."""
    calls = 0

    async def broken(db: object, cutoff: datetime) -> list[str]:
        nonlocal calls
        calls += 1
        raise asyncpg.InsufficientPrivilegeError("must be owner of table telemetry")

    monkeypatch.setattr(retention, "drop_expired", broken)
    made = 0

    async def counted(db: object, **kwargs: int) -> int:
        nonlocal made
        made += 1
        return 0

    monkeypatch.setattr(retention, "ensure_partitions", counted)
    task = asyncio.create_task(retention.run_retention(seam(pool), 168, 0.05))
    try:
        async with asyncio.timeout(10):
            while calls < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert made >= 3
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info  # the traceback once, not a pass
    assert "dropping expired partitions" in errors[0].getMessage()


async def test_a_day_made_by_a_member_of_the_owner_belongs_to_the_owner_and_is_dropped(
    database_url: str, pg_admin_dsn: str, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """Review 4 of 8 December: a role serving as a member of telemetry's owner made each
    day as itself; another member, or the owner, could detach such a day at its expiry
    but not drop it, and a detached table was never listed again: kept for ever. A day
    is the owner's now (migration 0021), and one that is still another role's is left
    attached, said, rather than detached and lost."""
    owner = await pool.fetchval("SELECT pg_get_userbyid(relowner) FROM pg_class "
                                "WHERE oid = 'telemetry'::regclass")  # fmt: skip
    member, stranger = (f"pulse_m_{uuid.uuid4().hex[:10]}" for _ in range(2))
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE ROLE "{member}" LOGIN; CREATE ROLE "{stranger}"')
    await admin.execute(f'GRANT "{owner}" TO "{member}"')
    old = date(2026, 1, 1)
    try:
        as_member = await asyncpg.connect(as_role(database_url, member))
        try:
            await as_member.fetchval("SELECT pulse_create_telemetry_partitions($1, $1)", old)
        finally:
            await as_member.close()
        made_by = "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = $1"
        assert await pool.fetchval(made_by, "telemetry_p20260101") == owner
        # A day another role still owns (made before 0021): kept attached, and said.
        await pool.fetchval("SELECT pulse_create_telemetry_partitions($1, $1)", old + timedelta(1))
        await admin.close()
        admin = await asyncpg.connect(database_url)
        await admin.execute(f'ALTER TABLE telemetry_p20260102 OWNER TO "{stranger}"')
        # Days a pass before 0021 detached and could not drop: out of telemetry for ever.
        await admin.execute(
            "CREATE TABLE telemetry_p20260103 (LIKE telemetry);"
            "CREATE TABLE telemetry_p20260104 (LIKE telemetry);"
            f'ALTER TABLE telemetry_p20260104 OWNER TO "{stranger}"'
        )
        member_pool = await asyncpg.create_pool(
            as_role(database_url, member), min_size=1, max_size=2
        )
        try:
            with caplog.at_level(logging.WARNING, logger="pulse.db.retention"):
                dropped = await drop_expired(seam(member_pool), datetime(2026, 1, 5, tzinfo=UTC))
        finally:
            await member_pool.close()
        assert dropped == ["telemetry_p20260101", "telemetry_p20260103"]
        attached = (
            "SELECT count(*) FROM pg_inherits WHERE inhrelid = 'telemetry_p20260102'::regclass"
        )
        assert await pool.fetchval(attached) == 1
        [said] = [r.getMessage() for r in caplog.records if "expired day" in r.getMessage()]
        assert (
            f"kept 2 expired day(s) owned by roles this one is not a member of: "
            f"telemetry_p20260102 ({stranger}), telemetry_p20260104 ({stranger}, out of "
            f"telemetry); drop each as its owner, or give it to telemetry's owner (ALTER "
            f"TABLE <day> OWNER TO {owner})"
        ) in said, said
    finally:
        await admin.execute(
            "DROP TABLE IF EXISTS telemetry_p20260102; DROP TABLE IF EXISTS telemetry_p20260104"
        )
        await admin.close()
        cleanup = await asyncpg.connect(pg_admin_dsn)
        await cleanup.execute(f'DROP ROLE "{member}"; DROP ROLE "{stranger}"')
        await cleanup.close()


def as_role(dsn: str, role: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))


async def test_a_member_makes_days_for_an_owner_without_create_on_the_schema(
    database_url: str, pg_admin_dsn: str, pool: asyncpg.Pool
) -> None:
    """Review 6 of 8 December: migration 0021 gave each new day to telemetry's owner,
    which PostgreSQL allows only when the owner may create in the schema: a member
    granted CREATE itself, serving for an owner without it, could make no day. The day
    stays its maker's then, as before 0021."""
    owner, member = (f"pulse_o_{uuid.uuid4().hex[:10]}" for _ in range(2))
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE ROLE "{owner}"; CREATE ROLE "{member}" LOGIN')
    await admin.execute(f'GRANT "{owner}" TO "{member}"')
    db = await asyncpg.connect(database_url)
    try:
        await db.execute(
            f'ALTER TABLE telemetry OWNER TO "{owner}";'
            "REVOKE CREATE ON SCHEMA public FROM PUBLIC;"
            f'GRANT CREATE ON SCHEMA public TO "{member}"'
        )
        as_member = await asyncpg.connect(as_role(database_url, member))
        try:
            made = "SELECT pulse_create_telemetry_partitions($1, $1)"
            assert await as_member.fetchval(made, date(2026, 1, 1)) == 1
        finally:
            await as_member.close()
        made_by = "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = $1"
        assert await pool.fetchval(made_by, "telemetry_p20260101") == member
    finally:
        await db.execute(f'DROP OWNED BY "{member}"; DROP OWNED BY "{owner}"')
        await db.close()
        await admin.execute(f'DROP ROLE "{member}"; DROP ROLE "{owner}"')
        await admin.close()
