"""Device statuses move with time, one sweeper per cluster, and every move is notified."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from pulse.db.pool import POOL_NAME
from pulse.fleet.sweeper import (
    APPLICATION_NAME,
    SWEEPER_LOCK_KEY,
    StatusSweeper,
    default_interval,
    sweep_statuses,
)
from tests.fleet.conftest import Fleet, MakeToken, Notifications, auth, kinds
from tests.support import running_server, seam

STALE_S = 30.0
OFFLINE_S = 300.0
DEVICES_CHANGED = [("devices", "t1"), ("devices", "*")]
ALERTS_CHANGED = [("alerts", "t1"), ("alerts", "*")]


class Clock:
    """The sweeper's idea of now, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@contextlib.asynccontextmanager
async def sweeping(sweeper: StatusSweeper) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sweeper.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def status(pool: asyncpg.Pool, device_id: str = "dev-1") -> str:
    return str(await pool.fetchval("SELECT status FROM devices WHERE device_id = $1", device_id))


async def last_seen(pool: asyncpg.Pool, device_id: str = "dev-1") -> datetime:
    value = await pool.fetchval("SELECT last_seen_at FROM devices WHERE device_id = $1", device_id)
    assert isinstance(value, datetime)
    return value


async def test_online_stale_offline_online(
    fleet: Fleet, notifications: Notifications, database_url: str
) -> None:
    pool = fleet.pool
    await fleet.send("dev-1", {"temp": 20})
    assert await status(pool) == "ONLINE"
    assert kinds(await notifications.since_last()) == DEVICES_CHANGED
    seen = await last_seen(pool)
    clock = Clock(seen + timedelta(seconds=STALE_S - 1))
    sweeper = StatusSweeper(
        seam(pool, database_url),
        stale_after_s=STALE_S,
        offline_after_s=OFFLINE_S,
        interval_s=0.01,
        clock=clock,
        forgive_downtime=False,  # the thresholds alone (the grace is tested below)
    )

    async def at(moment: datetime) -> list[tuple[str, str]]:
        # Two more rounds: the one in flight may have read the clock before it moved.
        clock.now = moment
        await asyncio.wait_for(sweeper.wait_rounds(sweeper.rounds + 2), 5)
        return sorted(kinds(await notifications.since_last()))

    async with sweeping(sweeper):
        await asyncio.wait_for(sweeper.leading.wait(), 5)
        assert await at(seen + timedelta(seconds=STALE_S)) == []
        assert await status(pool) == "ONLINE"

        assert await at(seen + timedelta(seconds=STALE_S + 1)) == sorted(
            DEVICES_CHANGED + ALERTS_CHANGED
        )
        assert await status(pool) == "STALE"
        [alert] = await fleet.alerts(alert_type="NO_HEARTBEAT")
        assert (alert["device_id"], alert["status"]) == ("dev-1", "OPEN")
        assert await at(seen + timedelta(seconds=STALE_S + 2)) == []

        assert await at(seen + timedelta(seconds=OFFLINE_S + 1)) == sorted(DEVICES_CHANGED)
        assert await status(pool) == "OFFLINE"
        assert await at(seen + timedelta(seconds=OFFLINE_S + 60)) == []

    assert sweeper.sweeps > 0

    # Being seen again is ingest's doing (the sweeper, with its clock far ahead,
    # is stopped), and it ends the NO_HEARTBEAT alert.
    await fleet.heartbeat("dev-1")
    assert await status(pool) == "ONLINE"
    assert sorted(kinds(await notifications.since_last())) == sorted(
        DEVICES_CHANGED + ALERTS_CHANGED
    )
    [alert] = await fleet.alerts(alert_type="NO_HEARTBEAT")
    assert (alert["status"], alert["closed_reason"]) == ("CLOSED", "device_online")
    # A device already ONLINE that is seen again changes nothing.
    await fleet.send("dev-1", {"temp": 21})
    assert kinds(await notifications.since_last()) == []


async def test_silence_while_no_server_swept_is_not_the_devices(
    fleet: Fleet, notifications: Notifications, database_url: str
) -> None:
    """Issue #22 item 8: after an outage longer than the thresholds, a device is judged
    by its silence since sweeping began, not since it was last seen."""
    pool = fleet.pool
    await fleet.send("dev-1", {"temp": 20})
    await notifications.since_last()
    seen = await last_seen(pool)
    start = seen + timedelta(hours=1)  # the servers were down for an hour
    clock = Clock(start)
    sweeper = StatusSweeper(
        seam(pool, database_url),
        stale_after_s=STALE_S,
        offline_after_s=OFFLINE_S,
        interval_s=0.01,
        clock=clock,
    )

    async def at(moment: datetime) -> list[tuple[str, str]]:
        clock.now = moment
        await asyncio.wait_for(sweeper.wait_rounds(sweeper.rounds + 2), 5)
        return sorted(kinds(await notifications.since_last()))

    async with sweeping(sweeper):
        await asyncio.wait_for(sweeper.leading.wait(), 5)
        assert await at(start) == []
        assert await at(start + timedelta(seconds=STALE_S - 1)) == []
        assert await status(pool) == "ONLINE"
        assert await fleet.alerts(alert_type="NO_HEARTBEAT") == []
        # Still silent a whole threshold after the start: now it is the device's.
        assert await at(start + timedelta(seconds=STALE_S + 1)) == sorted(
            DEVICES_CHANGED + ALERTS_CHANGED
        )
        assert await status(pool) == "STALE"
        [alert] = await fleet.alerts(alert_type="NO_HEARTBEAT")
        assert alert["details"]["last_seen_at"] == seen.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def test_a_handover_carries_on_and_a_gap_is_an_outage(
    fleet: Fleet, notifications: Notifications, database_url: str
) -> None:
    """A process that takes the sweeping over moments after the last sweep (a deploy, a
    crash) judges silence as the last sweeper did: no new grace, so a device that died
    just before a deploy goes STALE on time. After a longer gap in sweeping, the
    servers were away: the grace starts again from the takeover."""
    pool = fleet.pool
    await fleet.send("dev-1", {"temp": 20})
    await notifications.since_last()
    start = await last_seen(pool) + timedelta(hours=1)  # after an outage
    clock = Clock(start)

    def sweeper() -> StatusSweeper:
        return StatusSweeper(
            seam(pool, database_url),
            stale_after_s=STALE_S,
            offline_after_s=OFFLINE_S,
            interval_s=0.01,
            clock=clock,
        )

    async def at(swept: StatusSweeper, moment: datetime) -> list[tuple[str, str]]:
        clock.now = moment
        await asyncio.wait_for(swept.wait_rounds(swept.rounds + 2), 5)
        return sorted(kinds(await notifications.since_last()))

    first = sweeper()
    async with sweeping(first):
        await asyncio.wait_for(first.leading.wait(), 5)
        assert await at(first, start + timedelta(seconds=10)) == []
    # The next leader takes over at once: the same grace, not a new one.
    second = sweeper()
    async with sweeping(second):
        await asyncio.wait_for(second.leading.wait(), 5)
        assert await at(second, start + timedelta(seconds=STALE_S + 1)) == sorted(
            DEVICES_CHANGED + ALERTS_CHANGED
        )
        assert await status(pool) == "STALE"
    # dev-2 was seen at +20 s; then nobody sweeps for longer than a handover takes (an
    # outage): silence counts from the next takeover again.
    await fleet.device("dev-2")
    await pool.execute(
        "UPDATE devices SET status = 'ONLINE', last_seen_at = $1 WHERE device_id = 'dev-2'",
        start + timedelta(seconds=20),
    )
    await notifications.since_last()
    later = start + timedelta(seconds=STALE_S + 1 + second.handover_s + 60)
    clock.now = later
    third = sweeper()
    async with sweeping(third):
        await asyncio.wait_for(third.leading.wait(), 5)
        assert await at(third, later + timedelta(seconds=STALE_S - 1)) == []
        assert await status(pool, "dev-2") == "ONLINE"
        assert await at(third, later + timedelta(seconds=STALE_S + 1)) == sorted(
            DEVICES_CHANGED + ALERTS_CHANGED
        )
        assert await status(pool, "dev-2") == "STALE"


async def test_thresholds_and_the_set_based_pass(fleet: Fleet, database_url: str) -> None:
    pool = fleet.pool
    for device in ("dev-2", "dev-3", "dev-4"):
        await fleet.device(device)
    await fleet.send("dev-1", {"temp": 1})
    await fleet.send("dev-2", {"temp": 1})
    await fleet.heartbeat("dev-3")
    # dev-4 was never seen: OFFLINE from the start, and no alert for it.
    seen = await last_seen(pool, "dev-3")
    await pool.execute("UPDATE devices SET last_seen_at = $1 WHERE status = 'ONLINE'", seen)
    conn = await asyncpg.connect(database_url)
    try:

        async def sweep(after_s: float) -> tuple[int, int, int]:
            swept = await sweep_statuses(
                conn,
                stale_after_s=STALE_S,
                offline_after_s=OFFLINE_S,
                now=seen + timedelta(seconds=after_s),
            )
            return swept.stale, swept.offline, swept.alerts_opened

        assert await sweep(STALE_S) == (0, 0, 0)
        assert await sweep(STALE_S + 0.001) == (3, 0, 3)
        assert await sweep(OFFLINE_S) == (0, 0, 0)
        assert await sweep(OFFLINE_S + 0.001) == (0, 3, 0)
        assert await sweep(10 * OFFLINE_S) == (0, 0, 0)
        # Seen again (which closed its alert), then silent past both thresholds
        # before the next pass: one step to OFFLINE, and a new alert.
        await fleet.send("dev-1", {"temp": 1})
        seen = await last_seen(pool)
        assert await sweep(OFFLINE_S + 1) == (0, 1, 1)
    finally:
        await conn.close()
    rows = await pool.fetch("SELECT device_id, status FROM devices ORDER BY device_id")
    assert [tuple(r) for r in rows] == [
        ("dev-1", "OFFLINE"),
        ("dev-2", "OFFLINE"),
        ("dev-3", "OFFLINE"),
        ("dev-4", "OFFLINE"),
    ]
    assert len(await fleet.alerts(alert_type="NO_HEARTBEAT", status="OPEN")) == 3


async def test_change_triggers_are_statement_level(pool: asyncpg.Pool) -> None:
    rows = await pool.fetch(
        """SELECT tgname FROM pg_trigger
            WHERE tgrelid IN ('devices'::regclass, 'alerts'::regclass) AND NOT tgisinternal
              AND tgtype & 1 = 1"""  # TRIGGER_TYPE_ROW
    )
    assert rows == []


async def test_one_notification_per_tenant_for_a_statement(
    fleet: Fleet, notifications: Notifications
) -> None:
    await notifications.listen("t2")
    for device in ("dev-2", "dev-3"):
        await fleet.device(device)
    await fleet.device("dev-1", tenant_id="t2")
    await notifications.since_last()
    await fleet.pool.execute("UPDATE devices SET status = 'STALE'")
    assert sorted(kinds(await notifications.since_last())) == sorted(
        [("devices", "t1"), ("devices", "t2"), ("devices", "*")]
    )
    await fleet.pool.execute("UPDATE devices SET status = 'STALE', name = 'renamed'")
    assert kinds(await notifications.since_last()) == []


def _sweeper(pool: asyncpg.Pool, database_url: str) -> StatusSweeper:
    return StatusSweeper(
        seam(pool, database_url), stale_after_s=STALE_S, offline_after_s=OFFLINE_S, interval_s=0.02
    )


async def lock_holders(pool: asyncpg.Pool) -> list[int]:
    rows = await pool.fetch(
        """SELECT pid FROM pg_locks
            WHERE locktype = 'advisory' AND granted AND database = (
                  SELECT oid FROM pg_database WHERE datname = current_database())
              AND (classid::bigint << 32) | objid::bigint = $1""",
        SWEEPER_LOCK_KEY,
    )
    return [row["pid"] for row in rows]


async def first_to_lead(*sweepers: StatusSweeper) -> StatusSweeper:
    waits = {asyncio.ensure_future(s.leading.wait()): s for s in sweepers}
    done, pending = await asyncio.wait(waits, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    for future in pending:
        future.cancel()
    assert done, "no sweeper took the lead"
    return waits[done.pop()]


async def test_two_sweepers_one_leads_the_other_takes_over(
    pool: asyncpg.Pool, database_url: str
) -> None:
    a, b = _sweeper(pool, database_url), _sweeper(pool, database_url)
    async with sweeping(a) as task_a, sweeping(b) as task_b:
        leader = await first_to_lead(a, b)
        follower = b if leader is a else a
        # The follower keeps asking while the leader sweeps; it never sweeps itself.
        await asyncio.wait_for(follower.wait_rounds(follower.rounds + 5), 5)
        await asyncio.wait_for(leader.wait_rounds(leader.rounds + 5), 5)
        assert not follower.leading.is_set()
        assert follower.sweeps == 0
        assert leader.sweeps >= 5
        assert len(await lock_holders(pool)) == 1
        # The follower asks on a pooled connection: only the leader holds one of its own.
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = $1",
                APPLICATION_NAME,
            )
            == 1
        )

        (task_a if leader is a else task_b).cancel()
        await asyncio.wait_for(follower.leading.wait(), 5)
        await asyncio.wait_for(follower.wait_rounds(follower.rounds + 2), 5)
        assert follower.sweeps >= 1
        assert len(await lock_holders(pool)) == 1


async def test_a_leader_that_loses_its_connection_hands_over(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """Its lock goes with its connection; then one of the two leads, on a new connection
    (the old leader, back in a few milliseconds, may win the race), and the other
    follows."""
    a, b = _sweeper(pool, database_url), _sweeper(pool, database_url)
    async with sweeping(a), sweeping(b):
        await first_to_lead(a, b)
        [pid] = await lock_holders(pool)
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", pid)
        async with asyncio.timeout(5):
            while (holders := await lock_holders(pool)) in ([], [pid]):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert len(holders) == 1
        # Three rounds each: the old leader has met its lost connection by then.
        await asyncio.wait_for(
            asyncio.gather(a.wait_rounds(a.rounds + 3), b.wait_rounds(b.rounds + 3)), 5
        )
        [leader] = [s for s in (a, b) if s.leading.is_set()]
        swept = leader.sweeps
        await asyncio.wait_for(
            asyncio.gather(a.wait_rounds(a.rounds + 3), b.wait_rounds(b.rounds + 3)), 5
        )
        assert leader.leading.is_set() and leader.sweeps > swept
        assert [s for s in (a, b) if s.leading.is_set()] == [leader]
        assert await lock_holders(pool) == holders


# A sweeper in a process of its own, which prints "leading" once it leads and "stood
# down" once it has lost the lead; its dedicated connection is ended after 2 s of
# silence (pulse.db.database.DEDICATED_SILENCE_S, 15 in a server).
LEADER_SCRIPT = """\
import asyncio, sys
import pulse.db.database
pulse.db.database.DEDICATED_SILENCE_S = 2
from pulse.db.database import Database
from pulse.fleet.sweeper import StatusSweeper
async def main():
    async with Database.open(sys.argv[1], pool_size=1) as db:
        s = StatusSweeper(db, stale_after_s=30, offline_after_s=300, interval_s=0.02)
        task = asyncio.create_task(s.run())
        await s.leading.wait()
        print("leading", flush=True)
        while s.leading.is_set():
            await asyncio.sleep(0.02)
        print("stood down", flush=True)
        await task
asyncio.run(main())
"""


async def leader_process(database_url: str) -> asyncio.subprocess.Process:
    """LEADER_SCRIPT started, once it leads."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        LEADER_SCRIPT,
        database_url,
        stdout=asyncio.subprocess.PIPE,
        cwd=os.getcwd(),
    )
    try:
        assert process.stdout is not None
        assert await asyncio.wait_for(process.stdout.readline(), 20) == b"leading\n"
    except BaseException:
        process.kill()
        await process.wait()
        raise
    return process


async def test_a_killed_leader_process_is_taken_over(pool: asyncpg.Pool, database_url: str) -> None:
    process = await leader_process(database_url)
    try:
        survivor = _sweeper(pool, database_url)
        async with sweeping(survivor):
            await asyncio.wait_for(survivor.wait_rounds(3), 5)
            assert not survivor.leading.is_set()
            process.send_signal(signal.SIGKILL)  # no cleanup of any kind
            await asyncio.wait_for(process.wait(), 5)
            await asyncio.wait_for(survivor.leading.wait(), 10)
            await asyncio.wait_for(survivor.wait_rounds(survivor.rounds + 2), 5)
            assert survivor.sweeps >= 1
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_stopped_leader_process_is_taken_over(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """From the cluster audit: a leader stopped (SIGSTOP), or hung, keeps its connection
    and answers TCP probes, so its lock stayed held and nobody swept for as long as it
    hung. PostgreSQL now ends a dedicated connection silent for DEDICATED_SILENCE_S (2 s
    here): another process takes over, and the stopped one, woken, finds its lead gone."""
    process = await leader_process(database_url)
    try:
        (stopped,) = await lock_holders(pool)
        survivor = _sweeper(pool, database_url)
        async with sweeping(survivor):
            await asyncio.wait_for(survivor.wait_rounds(3), 5)
            assert not survivor.leading.is_set()
            process.send_signal(signal.SIGSTOP)
            await asyncio.wait_for(survivor.leading.wait(), 15)
            await asyncio.wait_for(survivor.wait_rounds(survivor.rounds + 2), 5)
            assert survivor.sweeps >= 1
            assert stopped not in await lock_holders(pool)
            process.send_signal(signal.SIGCONT)
            assert await asyncio.wait_for(process.stdout.readline(), 15) == b"stood down\n"
            await asyncio.wait_for(survivor.wait_rounds(survivor.rounds + 5), 5)
            assert survivor.leading.is_set() and len(await lock_holders(pool)) == 1
    finally:
        process.send_signal(signal.SIGCONT)
        if process.returncode is None:
            process.kill()
            await process.wait()


async def metric_lines(http: httpx.AsyncClient) -> set[str]:
    return set((await http.get("/metrics")).text.splitlines())


async def test_the_server_sweeps(
    database_url: str, settings: Settings, make_token: MakeToken, pool: asyncpg.Pool
) -> None:
    """The app runs the sweeper: short real thresholds instead of a test clock."""
    fast = Settings(
        database_url=database_url,
        jwt_secret=settings.jwt_secret,
        data_dir=settings.data_dir,
        stale_after_s=2.0,
        offline_after_s=5.0,
    )
    fleet = Fleet(pool)
    await fleet.device("dev-1")
    admin = auth(make_token("t1", roles=("tenant-admin",)))
    listener = await asyncpg.connect(database_url)
    changes: asyncio.Queue[str] = asyncio.Queue()
    channel = await listener.fetchval("SELECT pulse_channel('t1')")
    await listener.add_listener(channel, lambda *args: changes.put_nowait(args[3]))
    try:
        async with running_server(fast) as url, httpx.AsyncClient(base_url=url) as http:
            response = await http.post(
                "/ingest/v1/tenant/t1/device/dev-1/heartbeat",
                headers={"X-Provision-Token": fleet.tokens[("t1", "dev-1")]},
            )
            assert response.status_code == 204
            # Each status is read when its notification arrives: the steps are
            # 2 and 3 s apart, far longer than that read, even on a busy machine.
            seen: list[str] = []
            while not seen or seen[-1] != "OFFLINE":
                message = await asyncio.wait_for(changes.get(), 10)
                if '"devices"' in message:
                    seen.append(await status(pool))
            assert seen == ["ONLINE", "STALE", "OFFLINE"]
            summary = (await http.get("/api/v1/customer/fleet/summary", headers=admin)).json()
            assert summary == {
                "ONLINE": 0,
                "STALE": 0,
                "OFFLINE": 1,
                "total": 1,
                "active_alerts": 1,
            }
            # The operator's view: this process sweeps (and, alone, keeps the rollups);
            # a second process of the cluster does neither while it does.
            leads = {"pulse_status_sweeper 1.0", "pulse_rollups_keeper 1.0"}
            async with asyncio.timeout(10):
                while not leads <= await metric_lines(http):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            async with running_server(fast) as other, httpx.AsyncClient(base_url=other) as o:
                follows = {"pulse_status_sweeper 0.0", "pulse_rollups_keeper 0.0"}
                assert follows <= await metric_lines(o)
                assert leads <= await metric_lines(http)
    finally:
        await listener.close()


async def test_devices_whose_readings_wait_for_a_lock_are_not_taken_for_silent(
    database_url: str, settings: Settings, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    """The operations audit held a lock on `tenants` for 30 s (database up): every
    device's readings waited, and every device went STALE with a NO_HEARTBEAT alert,
    all closed 0.6 s after the lock's end when the readings went in. The sweeper now
    holds statuses while a write waits for a lock, and counts silence from the stall's
    end; a device that was silent before it still goes STALE and gets its alert."""
    fast = Settings(
        database_url=database_url,
        jwt_secret=settings.jwt_secret,
        data_dir=settings.data_dir,
        stale_after_s=3.0,  # a wait is taken for a stall after 1 s
        offline_after_s=60.0,
    )
    fleet = Fleet(pool)
    reporting = ("dev-1", "dev-2")
    for device in (*reporting, "quiet"):
        await fleet.device(device)
    stop = asyncio.Event()
    holder = await asyncpg.connect(database_url)
    caplog.set_level(logging.INFO, logger="pulse.fleet.sweeper")
    async with running_server(fast) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:

        async def post(device: str) -> int:
            r = await http.post(
                f"/ingest/v1/tenant/t1/device/{device}/telemetry",
                json={"metrics": {"temp": 20}},
                headers={"X-Provision-Token": fleet.tokens[("t1", device)]},
            )
            assert r.status_code in (201, 503), r.text  # a device retries a 503
            return r.status_code

        async def report(device: str) -> None:
            while not stop.is_set():
                await post(device)
                await asyncio.sleep(0.2)  # the devices' pace

        assert await post("quiet") == 201  # once, then silent
        reporters = [asyncio.create_task(report(d)) for d in reporting]
        try:
            async with asyncio.timeout(30):
                while {await status(pool, d) for d in reporting} != {"ONLINE"}:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            # The tenant's row held, as a long transaction updating it would: every
            # write of the tenant waits for it, for three thresholds.
            async with holder.transaction():
                await holder.execute(
                    "SELECT 1 FROM tenants WHERE tenant_id = 't1' FOR NO KEY UPDATE"
                )
                await asyncio.sleep(2 * fast.stale_after_s)  # the lock's length, the scenario
            released = await pool.fetchval("SELECT now()")
            # Until both report again (their readings written after the lock's end).
            async with asyncio.timeout(30):
                while min([await last_seen(pool, d) for d in reporting]) <= released:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            # The silent one: STALE, a threshold after the stall at the latest.
            async with asyncio.timeout(30):
                while await status(pool, "quiet") != "STALE":  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            stop.set()
            await asyncio.gather(*reporters)
            await holder.close()
    alerted = {a["device_id"] for a in await fleet.alerts(alert_type="NO_HEARTBEAT")}
    assert alerted == {"quiet"}, alerted
    assert {await status(pool, d) for d in reporting} == {"ONLINE"}
    said = [r.getMessage() for r in caplog.records if r.name == "pulse.fleet.sweeper"]
    held = [m for m in said if m.startswith("device statuses held: pid ")]
    assert len(held) == 1 and "for a transactionid lock" in held[0], said
    assert sum(m.startswith("device statuses move again: ") for m in said) == 1, said


@contextlib.asynccontextmanager
async def a_session_waiting(
    database_url: str, take: str, name: str = POOL_NAME
) -> AsyncIterator[None]:
    """A session named ``name`` (by default as Pulse's pool's are) waiting for a lock,
    ``take``, which another holds, for over a second when the block begins."""
    holder = await asyncpg.connect(database_url)
    waiter = await asyncpg.connect(database_url, server_settings={"application_name": name})
    try:
        await holder.execute("BEGIN")
        await holder.execute(take)
        waiting = asyncio.create_task(waiter.execute(take))
        pid = waiter.get_server_pid()
        waited = (
            "SELECT clock_timestamp() - waitstart > interval '1.2 s' FROM pg_locks"
            " WHERE pid = $1 AND NOT granted"
        )
        async with asyncio.timeout(30):
            while not await holder.fetchval(waited, pid):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        yield
        assert not waiting.done(), "still waiting at the end"
    finally:
        holder.terminate()
        waiter.terminate()


async def silent_for_an_hour(fleet: Fleet, database_url: str) -> StatusSweeper:
    """dev-1, last seen an hour ago, and a sweeper on the real clock (no grace)."""
    await fleet.send("dev-1", {"temp": 20})
    await fleet.pool.execute("UPDATE devices SET last_seen_at = now() - interval '1 hour'")
    return StatusSweeper(
        seam(fleet.pool, database_url),
        stale_after_s=2.0,
        offline_after_s=7200.0,
        interval_s=0.05,
        forgive_downtime=False,
    )


@pytest.mark.parametrize(
    ("take", "name"),
    [
        ("SELECT pg_advisory_lock(77)", POOL_NAME),
        ("SELECT 1 FROM tenants WHERE tenant_id = 't1' FOR NO KEY UPDATE", "psql"),
    ],
    ids=["an advisory lock", "another program"],
)
async def test_a_wait_that_holds_up_no_write_holds_no_status(
    fleet: Fleet, database_url: str, take: str, name: str
) -> None:
    """The reviews of 36b8097 and 1dfa41b: any session of the user waiting for any lock
    held every status: a second `pulse migrate` queued on the migrations' advisory lock,
    a psql. Only the pool's sessions (Pulse's writes) waiting on a row, a transaction
    or a table hold them now."""
    sweeper = await silent_for_an_hour(fleet, database_url)
    async with a_session_waiting(database_url, take, name), sweeping(sweeper):
        await asyncio.wait_for(sweeper.leading.wait(), 10)
        await asyncio.wait_for(sweeper.wait_rounds(sweeper.rounds + 2), 10)
        assert await status(fleet.pool) == "STALE"


async def test_statuses_are_held_for_a_wait_at_most_for_a_while(
    fleet: Fleet, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The review of 36b8097: a hold had no end, so a session left idle in a transaction
    holding a tenant's row kept every dead device ONLINE for as long. It lasts at most
    ``hold_at_most_s`` (PULSE_OFFLINE_AFTER_S), then statuses move again, said once."""
    sweeper = await silent_for_an_hour(fleet, database_url)
    sweeper.hold_at_most_s = 2.0
    caplog.set_level(logging.INFO, logger="pulse.fleet.sweeper")
    take = "SELECT 1 FROM tenants WHERE tenant_id = 't1' FOR NO KEY UPDATE"
    async with a_session_waiting(database_url, take), sweeping(sweeper):
        await asyncio.wait_for(sweeper.leading.wait(), 10)
        await asyncio.wait_for(sweeper.wait_rounds(sweeper.rounds + 2), 10)
        assert await status(fleet.pool) == "ONLINE"  # held
        async with asyncio.timeout(30):
            while await status(fleet.pool) != "STALE":  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    said = [r.getMessage() for r in caplog.records if r.name == "pulse.fleet.sweeper"]
    moved = [m for m in said if m.startswith("device statuses move again although pid ")]
    assert len(moved) == 1 and "held for 2 s, the longest allowed" in moved[0], said


def test_default_interval_is_a_fraction_of_the_threshold() -> None:
    assert default_interval(30) == 1.0
    assert default_interval(2) == 0.2
    assert default_interval(0.1) == 0.05


async def test_a_sweep_moves_every_due_device_in_statements_of_a_batch(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """At most ``batch`` devices move per statement (a site's thousands going silent
    together are moved in short statements), and the sweep repeats it until every
    due device has moved."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    await pool.execute(
        """INSERT INTO devices (tenant_id, device_id, token_hash, status, last_seen_at)
           SELECT 't1', 'dev-' || g, '\\x00', 'ONLINE', now() - interval '1 minute'
             FROM generate_series(1, 7) g"""
    )
    conn = await asyncpg.connect(database_url)
    try:
        swept = await sweep_statuses(
            conn, stale_after_s=STALE_S, offline_after_s=OFFLINE_S, batch=3
        )
    finally:
        await conn.close()
    assert (swept.stale, swept.offline, swept.alerts_opened) == (7, 0, 7)
    assert await pool.fetchval("SELECT count(*) FROM devices WHERE status = 'STALE'") == 7


async def test_status_triggers_take_linear_time_on_a_connection_that_fired_them_before(
    database_url: str, pool: asyncpg.Pool
) -> None:
    """From the fleet audit (HIGH): the triggers that notify status moves joined the old
    and new rows with the plan PL/pgSQL kept from small statements, a nested loop: on
    the sweeper's connection (empty sweeps every second), 20,000 devices going STALE
    together took 49 s, and ingest marking 20,000 devices seen 30 s; alerts alike.
    Migration 0016 compares them as sets. Each statement here must end within 5 s (it
    takes a fraction of a second; the nested loop, tens of seconds)."""
    await pool.execute("INSERT INTO tenants (tenant_id) VALUES ('t1')")
    await pool.execute(
        """INSERT INTO devices (tenant_id, device_id, token_hash, status)
           SELECT 't1', 'dev-' || g, '\\x00', 'ONLINE' FROM generate_series(1, 20000) g"""
    )
    await pool.execute(
        """INSERT INTO alerts (tenant_id, device_id, alert_type, severity, summary)
           SELECT 't1', 'dev-' || g, 'NO_HEARTBEAT', 3, 'silent'
             FROM generate_series(1, 20000) g"""
    )
    conn = await asyncpg.connect(database_url, server_settings={"statement_timeout": "5s"})
    try:
        for _ in range(6):  # as the sweeper's connection: its plans made for no rows
            await conn.execute("UPDATE devices SET status = 'OFFLINE' WHERE false")
            await conn.execute("UPDATE alerts SET status = 'CLOSED' WHERE false")
        async with conn.transaction():
            assert await conn.execute("UPDATE devices SET status = 'STALE'") == "UPDATE 20000"
            assert await conn.execute("UPDATE devices SET last_seen_at = now()") == "UPDATE 20000"
            assert (
                await conn.execute(
                    "UPDATE alerts SET status = 'CLOSED', closed_at = now(), "
                    "closed_reason = 'manual'"
                )
                == "UPDATE 20000"
            )
    finally:
        await conn.close()
