"""A write refused unavailable (503) or rolled back gives back the rate it was charged.

From the integrity audit (LOW-2): tokens were taken when a write's messages were
checked and never given back when the write then failed. With a burst of 200, a tenant's
row held 12 s by another transaction, and five batches of 32 sent meanwhile, two were
answered 200 and three 503; the next batch of 150 had 111 refused rate_limited, the 96
readings answered 503 (never stored) having been charged. A write whose COMMIT went out
and whose outcome is not known (given up at a stop) is not given back: it may be stored.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Mapping
from typing import Any

import asyncpg
import pytest

from pulse.db.errors import DatabaseUnavailable
from pulse.errors import RATE_LIMITED
from pulse.fleet.rules import evaluate_alerts
from pulse.ingest.model import Accepted, Device, Rejected, Submission
from pulse.ingest.ratelimit import Admission, RateLimiter
from pulse.ingest.writer import CHECK_AHEAD_FROM, TelemetryWriter, Written
from pulse.web.errors import error_for
from tests.ingest.test_foresight import one_waits_after_its_insert
from tests.ingest.test_stop import LOCK, commit_waits, held, no_op, stored
from tests.ingest.test_stop import held_commit as held_commit  # a fixture
from tests.ingest.test_waiting import WAIT_S, readings
from tests.support import seam, until

DEVICE: Device = ("t1", "dev-1")


class Budget:
    """Admission that grants each device at most ``grant`` messages per write, and
    records what it admitted and what it was given back."""

    def __init__(self, grant: int = 10**6) -> None:
        self.grant = grant
        self.admitted: collections.Counter[Device] = collections.Counter()
        self.refunded: collections.Counter[Device] = collections.Counter()

    def admit(self, counts: Mapping[Device, int]) -> dict[Device, tuple[int, Rejected]]:
        refused = {}
        for device, count in counts.items():
            granted = min(count, self.grant)
            self.admitted[device] += granted
            if granted < count:
                refused[device] = (granted, Rejected(RATE_LIMITED, "slow down", 1.0))
        return refused

    def refund(self, counts: Mapping[Device, int]) -> None:
        self.refunded.update(counts)

    def writer(self, pool: asyncpg.Pool, **options: Any) -> TelemetryWriter:
        return TelemetryWriter(seam(pool), admit=self.admit, refund=self.refund, **options)


def limiter(burst: int) -> RateLimiter:
    return RateLimiter(rate=0.01, burst=burst)  # nothing comes back while the test runs


@pytest.mark.parametrize("limit", ["device", "tenant"])
async def test_a_batch_refused_after_waiting_for_its_tenant_is_not_charged(
    pool: asyncpg.Pool, token: str, limit: str
) -> None:
    """The audit's case: a batch checked ahead (32 readings) queues behind two
    transactions that do not end, and is answered 503 after ``wait_s``."""
    burst = CHECK_AHEAD_FROM + 8
    admission = Admission(
        per_device=limiter(burst if limit == "device" else 10**6),
        per_tenant=limiter(burst if limit == "tenant" else 10**6),
    )
    release = asyncio.Event()
    held_first = asyncio.Event()

    async def stuck(conn: asyncpg.Connection, written: Written) -> None:
        if not held_first.is_set():
            held_first.set()
            await release.wait()

    writer = TelemetryWriter(
        seam(pool),
        admit=admission.each,
        refund=admission.refund,
        hooks=[stuck],
        wait_s=WAIT_S,
    )
    first = asyncio.ensure_future(writer.write(readings(token, 1)))
    try:
        await asyncio.wait_for(held_first.wait(), 10)
        second = asyncio.ensure_future(writer.write(readings(token, 2)))
        await one_waits_after_its_insert(pool)
        with pytest.raises(DatabaseUnavailable, match="nothing of it was stored"):
            await asyncio.wait_for(writer.write(readings(token, *range(CHECK_AHEAD_FROM))), 10)
    finally:
        release.set()
    assert await asyncio.wait_for(first, 10) == [Accepted(1)]
    assert await asyncio.wait_for(second, 10) == [Accepted(2)]
    # What is left of the burst, all of it: the 32 refused 503 took none.
    outcomes = await writer.write(readings(token, *range(burst - 2)))
    assert all(isinstance(outcome, Accepted) for outcome in outcomes), outcomes
    over = await writer.write(readings(token, 0))
    assert isinstance(over[0], Rejected) and over[0].reason is RATE_LIMITED


async def fails(conn: asyncpg.Connection, written: Written) -> None:
    """A hook: the transaction rolls back, as for a statement the database cancelled."""
    raise DatabaseUnavailable("canceling statement due to user request")


@pytest.mark.parametrize("size", [1, CHECK_AHEAD_FROM], ids=["checked-inside", "checked-ahead"])
@pytest.mark.parametrize("group_commit", [True, False])
async def test_a_write_rolled_back_gives_back_what_its_checks_admitted(
    pool: asyncpg.Pool, token: str, size: int, group_commit: bool
) -> None:
    """Whether its checks were made in its transaction or ahead of it; a message
    refused (wrong token, over the rate) was not charged and is not given back."""
    budget = Budget(grant=size + 1)
    writer = budget.writer(pool, hooks=[fails], group_commit=group_commit)
    wrong = Submission("t1", "dev-1", "pdt_wrong", None)
    with pytest.raises(DatabaseUnavailable):
        await writer.write([wrong, *readings(token, *range(size + 2))])
    assert budget.admitted == {DEVICE: size + 1}
    assert budget.refunded == budget.admitted
    assert await stored(pool) == []


async def test_a_write_remade_after_a_wrong_foresight_is_charged_and_given_back_once(
    pool: asyncpg.Pool, token: str
) -> None:
    """A foreseen write whose ids another process took is rolled back and made again,
    keeping its checks: when the second attempt fails too, it gives back once."""
    failing = False

    async def fails_when_told(conn: asyncpg.Connection, written: Written) -> None:
        if failing:
            await fails(conn, written)

    budget = Budget()
    here = budget.writer(pool, hooks=[fails_when_told])
    there = TelemetryWriter(seam(pool))  # another process writing the same tenant
    assert await here.write(readings(token, 0)) == [Accepted(1)]  # reserved: it learns
    assert await there.write(readings(token, 1)) == [Accepted(2)]
    failing = True
    with pytest.raises(DatabaseUnavailable):
        await here.write(readings(token, 2))
    assert (here.ids.foreseen, here.ids.wrong) == (1, 1)
    assert budget.admitted == {DEVICE: 2}
    assert budget.refunded == {DEVICE: 1}


async def test_a_stop_gives_back_a_write_it_ended_but_not_one_whose_commit_went_out(
    pool: asyncpg.Pool, token: str, held_commit: asyncpg.Connection
) -> None:
    """The first write's COMMIT waits in the database and is given up at the end of the
    grace: 503, but it may be stored (a cancel cannot undo a COMMIT that arrived), so
    its rate stays spent. The second, ended at the stop before its COMMIT, gives back."""
    budget = Budget()
    stopping = await held(
        pool, token, held_commit, hooks=[no_op], admit=budget.admit, refund=budget.refund
    )
    first = asyncio.ensure_future(stopping.write(readings(token, 1)))
    await commit_waits(pool)
    second = asyncio.ensure_future(stopping.write(readings(token, 2)))
    await one_waits_after_its_insert(pool)
    stopping.stop(grace_s=0.3)
    with pytest.raises(DatabaseUnavailable, match="not known to be committed"):
        await asyncio.wait_for(second, 5)
    with pytest.raises(DatabaseUnavailable, match="not known to be committed"):
        await asyncio.wait_for(first, 5)
    await until(lambda: not stopping._in_flight)  # both transactions have ended
    assert budget.admitted == {DEVICE: 3}  # with the reading `held` wrote first
    assert budget.refunded == {DEVICE: 1}
    await held_commit.execute("SELECT pg_advisory_unlock($1)", LOCK)


async def test_a_large_write_whose_checks_come_too_late_is_not_charged(
    pool: asyncpg.Pool, token: str, database_url: str
) -> None:
    """Its checks wait on a lock past ``wait_s``: answered 503. When they come, what
    they admitted for it is given back, for it will not be written."""
    budget = Budget()
    writer = budget.writer(pool, wait_s=WAIT_S)
    locker = await asyncpg.connect(database_url)
    try:
        lock = locker.transaction()
        await lock.start()
        await locker.execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(DatabaseUnavailable, match="could not be checked"):
            await asyncio.wait_for(writer.write(readings(token, *range(CHECK_AHEAD_FROM))), 10)
        await lock.rollback()
    finally:
        await locker.close()
    await until(lambda: bool(budget.admitted))  # the checks came, once the lock went
    await until(lambda: writer._checking is None)
    assert budget.admitted == {DEVICE: CHECK_AHEAD_FROM}
    assert budget.refunded == budget.admitted
    assert await stored(pool) == []


async def test_a_large_write_whose_checks_come_back_as_the_server_stops_is_not_written(
    pool: asyncpg.Pool, token: str
) -> None:
    """Found while fixing LOW-2: a large write whose checks came back just before a stop
    (its caller not yet resumed, so the stop could not answer it) went on to queue and
    commit after the stop, when nothing may begin. Now it is answered 503, unwritten,
    and its checks' admissions are given back. The stop comes here between the checks'
    return and the write's next step."""
    budget = Budget()
    writer = budget.writer(pool)
    check = writer._check

    async def check_then_stop(*args: Any) -> Any:
        checked = await check(*args)
        writer.stop()
        return checked

    writer._check = check_then_stop  # type: ignore[method-assign]
    with pytest.raises(DatabaseUnavailable, match="shutting down"):
        await asyncio.wait_for(writer.write(readings(token, *range(CHECK_AHEAD_FROM))), 10)
    assert await stored(pool) == []
    assert budget.admitted == {DEVICE: CHECK_AHEAD_FROM}
    assert budget.refunded == budget.admitted


async def test_a_write_whose_rules_run_past_the_statement_timeout_is_given_back_and_said_so(
    pool: asyncpg.Pool, token: str
) -> None:
    """Security audit M1/L2: a batch whose rule evaluation ran past the statement's
    timeout was answered "The database is unreachable". Its transaction never reached
    COMMIT, so nothing was stored, and what it was charged is given back (that stays).
    The evaluation waits here for a lock the test holds on ``alerts``, until the
    statement_timeout cancels it."""
    await pool.execute(
        """INSERT INTO alert_rules (tenant_id, name, metric, operator, threshold, severity)
           VALUES ('t1', 'hot', 'v', '>', 0, 3)"""
    )

    async def timed(conn: asyncpg.Connection, written: Written) -> None:
        await conn.execute("SET LOCAL statement_timeout = '100ms'")
        await evaluate_alerts(conn, written)

    budget = Budget()
    writer = budget.writer(pool, rules=timed)
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("LOCK TABLE alerts IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(DatabaseUnavailable) as raised:
            await asyncio.wait_for(writer.write(readings(token, 5)), 10)
    error = error_for(raised.value)
    assert (error.status, error.error.code) == (503, "database_unavailable")
    assert error.detail is not None
    assert error.detail.startswith("The database took too long to answer"), error.detail
    assert budget.refunded == budget.admitted == {DEVICE: 1}
    assert await stored(pool) == []
