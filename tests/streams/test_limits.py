"""ConnectionLimits against the real database: several instances play several processes."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from pulse.db.errors import DatabaseUnavailable
from pulse.errors import CONNECTION_LIMIT
from pulse.streams import limits as limits_module
from pulse.streams.limits import ConnectionLimits, LimitReached
from tests.support import seam, until

pytestmark = pytest.mark.timeout(60)


async def until_true(read: Callable[[], Awaitable[int]], expected: int) -> None:
    """Wait until ``read`` answers ``expected``, for at most 10 s."""
    async with asyncio.timeout(10):
        while await read() != expected:  # noqa: ASYNC110  (a database count: no event)
            await asyncio.sleep(0.01)


async def started(
    pool: asyncpg.Pool, *, per_tenant: int = 3, ttl_s: float = 15.0
) -> ConnectionLimits:
    limits = ConnectionLimits(seam(pool), 1000, per_tenant, ttl_s=ttl_s)
    await limits.start()
    return limits


async def rows(pool: asyncpg.Pool, tenant: str = "t1") -> int:
    """The tenant's connection rows; the per-process counters that admission sums
    (migration 0005) must agree with them after whatever the test did."""
    truth = dict(
        await pool.fetch(
            "SELECT process_id, count(*) FROM stream_connections WHERE tenant_id = $1 "
            "GROUP BY process_id",
            tenant,
        )
    )
    counted = dict(
        await pool.fetch(
            "SELECT process_id, connections FROM stream_tenant_counts "
            "WHERE tenant_id = $1 AND connections > 0",
            tenant,
        )
    )
    assert counted == truth
    return sum(truth.values())


async def test_processes_share_the_tenant_limit_under_concurrent_admission(
    pool: asyncpg.Pool,
) -> None:
    a, b = await started(pool, per_tenant=5), await started(pool, per_tenant=5)
    release = asyncio.Event()
    outcomes: list[str] = []
    decided = asyncio.Semaphore(0)

    async def connect(limits: ConnectionLimits, kind: str) -> None:
        try:
            async with limits.hold(kind, "t1"):
                outcomes.append("admitted")
                decided.release()
                await release.wait()
        except LimitReached:
            outcomes.append("refused")
            decided.release()

    attempts = [(p, k) for p in (a, b) for k in ("sse", "websocket") * 6]
    tasks = [asyncio.create_task(connect(p, k)) for p, k in attempts]
    for _ in attempts:
        await decided.acquire()
    assert outcomes.count("admitted") == 5 and outcomes.count("refused") == 19
    assert await rows(pool) == 5
    assert a.total + b.total == 5
    # Other tenants have their own count.
    async with a.hold("legacy_v2", "t2"):
        assert await rows(pool, "t2") == 1
    release.set()
    await asyncio.gather(*tasks)
    assert await rows(pool) == 0 and a.total == b.total == 0
    await a.check("t1")


async def test_the_process_limit_is_local(pool: asyncpg.Pool) -> None:
    limits = ConnectionLimits(seam(pool), 2, 100)
    await limits.start()
    async with limits.hold("sse", "t1"), limits.hold("websocket", "t2"):
        with pytest.raises(LimitReached):
            async with limits.hold("sse", "t3"):
                pass
        with pytest.raises(LimitReached):
            await limits.check("t3")
    assert limits.by_kind == {"sse": 0, "websocket": 0}


async def test_a_crashed_process_stops_counting_within_the_ttl(pool: asyncpg.Pool) -> None:
    # A TTL long enough for the setup to finish inside it on a busy machine.
    renewed = time.monotonic()  # `crashed` starts (renews) after this
    crashed, survivor = await started(pool, ttl_s=4), await started(pool, ttl_s=4)
    held = contextlib.AsyncExitStack()
    for _ in range(3):
        await held.enter_async_context(crashed.hold("sse", "t1"))
    with pytest.raises(LimitReached):
        await survivor.check("t1")
    # The crash: `crashed` never renews, releases nothing.
    while True:
        try:
            await survivor.check("t1")
            break
        except LimitReached:
            await asyncio.sleep(0.02)
    assert time.monotonic() - renewed <= 4 + 1.5  # the TTL, and a check's time to spare
    async with survivor.hold("sse", "t1"):
        await survivor.renew()  # clears the dead process and its rows
        assert await rows(pool) == 1
    assert await pool.fetchval("SELECT count(*) FROM stream_processes") == 1
    held.pop_all()


async def test_a_process_whose_lease_lapsed_records_its_connections_again(
    pool: asyncpg.Pool,
) -> None:
    a, b = await started(pool, ttl_s=0.3), await started(pool, ttl_s=30)
    async with a.hold("sse", "t1"), a.hold("websocket", "t1"):
        await asyncio.sleep(0.4)
        await b.renew()  # deletes a's lapsed lease with its rows
        assert await rows(pool) == 0
        await a.renew()  # a was only slow: its connections count again
        assert await rows(pool) == 2
        # A lapse noticed at admission: registering again, then admitting.
        await pool.execute("DELETE FROM stream_processes WHERE process_id = $1", a.process_id)
        async with a.hold("legacy_v2", "t1"):
            assert await rows(pool) == 3
            await a.renew()
            assert await rows(pool) == 3
        assert await rows(pool) == 2
        await pool.execute("DELETE FROM stream_processes WHERE process_id = $1", a.process_id)
        await a.renew()
        assert await rows(pool) == 2


async def lapsed(pool: asyncpg.Pool, limits: ConnectionLimits) -> None:
    """Wait until the database holds ``limits``'s lease expired."""
    await until_true(
        lambda: pool.fetchval(
            "SELECT count(*) FROM stream_processes "
            "WHERE process_id = $1 AND expires_at < clock_timestamp()",
            limits.process_id,
        ),
        1,
    )


@pytest.mark.parametrize("cleared", [False, True], ids=["row-kept", "row-cleared"])
async def test_a_lapsed_process_ends_its_connections_over_the_limit(
    pool: asyncpg.Pool, cleared: bool
) -> None:
    """While a stalled process's lease had lapsed, another filled the tenant's limit
    with its connections not counted: at its next renewal the stalled process admits
    its own again, oldest first, and ends those over the limit (3 here, not 5)."""
    slow, other = await started(pool, ttl_s=0.3), await started(pool, ttl_s=30)
    ended: list[tuple[str, object]] = []
    async with contextlib.AsyncExitStack() as held:
        for name in ("oldest", "middle", "newest"):
            end = functools.partial(lambda n, error: ended.append((n, error)), name)
            await held.enter_async_context(slow.hold("sse", "t1", end=end))
        await lapsed(pool, slow)
        if cleared:
            await other.renew()  # deletes the lapsed lease with its rows
        for _ in range(2):
            await held.enter_async_context(other.hold("websocket", "t1"))
        await slow.renew()
        assert ended == [("middle", CONNECTION_LIMIT), ("newest", CONNECTION_LIMIT)]
        assert await rows(pool) == 3
        assert slow.total == 3  # counted here until their streams end
        ended.clear()
        await slow.renew()  # a lease in force: nothing more is ended
        assert ended == [] and await rows(pool) == 3
    assert await rows(pool) == 0


async def test_rows_whose_release_failed_are_deleted_by_the_next_renewal(
    pool: asyncpg.Pool,
) -> None:
    limits = await started(pool)
    async with limits.hold("sse", "t1"):
        # As if an earlier connection's DELETE had failed: its row is still there.
        await pool.execute(
            "INSERT INTO stream_connections (process_id, connection_id, tenant_id, kind) "
            "VALUES ($1, 0, 't1', 'sse')",
            limits.process_id,
        )
        assert await rows(pool) == 2
        await limits.renew()
        assert await rows(pool) == 1
    await limits.stop()
    assert await pool.fetchval("SELECT count(*) FROM stream_processes") == 0


async def test_admission_counts_right_at_a_thousand_connections(pool: asyncpg.Pool) -> None:
    """Admission sums counters, not rows: the limit still holds exactly at scale."""
    a, b = await started(pool, per_tenant=1000), await started(pool, per_tenant=1000)
    async with contextlib.AsyncExitStack() as held:
        for i in range(1000):
            await held.enter_async_context((a if i % 2 else b).hold("sse", "t1"))
        assert await rows(pool) == 1000
        with pytest.raises(LimitReached):
            await a.check("t1")
        with pytest.raises(LimitReached):
            async with b.hold("websocket", "t1"):
                pass
        async with a.hold("sse", "t2"):
            assert await rows(pool, "t2") == 1
    assert await rows(pool) == 0
    await a.check("t1")


async def test_the_check_reads_a_count_below_the_limit_once_a_second(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of reconnects asks the database once per tenant; the hold still enforces."""
    # "Once a second" made a minute: a busy machine's few round trips between the read
    # and the check that trusts it must not outlast it.
    monkeypatch.setattr(limits_module, "CHECK_FRESH_S", 60.0)
    a, b = await started(pool), await started(pool)
    await a.check("t1")
    async with contextlib.AsyncExitStack() as held:
        for _ in range(3):
            await held.enter_async_context(a.hold("sse", "t1"))
        with pytest.raises(LimitReached):
            await a.check("t1")  # this process's own admissions count at once
    await a.check("t1")
    async with contextlib.AsyncExitStack() as held:
        for _ in range(3):
            await held.enter_async_context(b.hold("sse", "t1"))
        await a.check("t1")  # the count read a moment ago: a hint, not a reservation
        with pytest.raises(LimitReached):
            async with a.hold("sse", "t1"):
                pass
        monkeypatch.setattr(limits_module, "CHECK_FRESH_S", 0.0)
        with pytest.raises(LimitReached):
            await a.check("t1")
        monkeypatch.setattr(limits_module, "CHECK_FRESH_S", 60.0)
        with pytest.raises(LimitReached):
            await a.check("t1")  # at the limit: never answered from memory


async def test_connections_arriving_together_are_admitted_in_few_statements(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 connects of two tenants at once: a handful of round trips, the limit exact."""
    limits = await started(pool, per_tenant=150)
    statements = 0
    fetch = limits._db.fetch

    async def counted(query: str, *args: object) -> list[asyncpg.Record]:
        nonlocal statements
        statements += 1
        return await fetch(query, *args)

    monkeypatch.setattr(limits._db, "fetch", counted)
    release = asyncio.Event()
    outcomes: list[str] = []

    async def connect(tenant: str) -> None:
        try:
            async with limits.hold("sse", tenant):
                outcomes.append(tenant)
                await release.wait()
        except LimitReached:
            outcomes.append("refused")

    tasks = [asyncio.create_task(connect(t)) for t in ("t1", "t2") * 100 + ("t1",) * 60]
    await until(lambda: len(outcomes) == len(tasks))
    assert outcomes.count("t1") == 150 and outcomes.count("t2") == 100
    assert outcomes.count("refused") == 10
    assert await rows(pool, "t1") == 150 and await rows(pool, "t2") == 100
    assert statements <= 5, statements
    release.set()
    await asyncio.gather(*tasks)
    assert await rows(pool, "t1") == 0


async def test_a_connection_gone_during_its_admission_leaves_no_row(pool: asyncpg.Pool) -> None:
    limits = await started(pool)
    held = asyncio.Event()

    async def connect() -> None:
        async with limits.hold("sse", "t1"):
            held.set()
            await asyncio.Event().wait()

    first = asyncio.create_task(connect())
    await held.wait()
    # The second's batch is in flight when its client goes.
    second = asyncio.create_task(connect())
    await asyncio.sleep(0)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    await until_true(lambda: rows(pool), 1)
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    await until_true(lambda: rows(pool), 0)
    assert limits.total == 0


async def test_a_failed_count_read_whose_checks_all_went_is_not_left_unretrieved(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The clients that waited on a shared count read went away; the read then fails.
    Nobody awaits it any more: asyncio must not log its exception as never retrieved."""
    limits = await started(pool)
    reading, fail = asyncio.Event(), asyncio.Event()

    async def failing_read(query: str, *args: object) -> int:
        reading.set()
        await fail.wait()
        raise DatabaseUnavailable("the database went away")

    monkeypatch.setattr(limits._db, "fetchval", failing_read)
    checks = [asyncio.create_task(limits.check("t1")) for _ in range(3)]
    await reading.wait()
    for check in checks:
        check.cancel()
    await asyncio.gather(*checks, return_exceptions=True)
    fail.set()
    await until(lambda: not limits._reading)
    await asyncio.sleep(0)  # the read's own done callbacks run on the next loop turn
    del checks, check  # their frames hold the read: let it be collected now
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
    assert "never retrieved" not in caplog.text
    # The next check reads again, and sees the failure itself.
    with pytest.raises(DatabaseUnavailable):
        await limits.check("t1")


async def test_connections_leaving_together_are_released_in_few_statements(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """200 clients that leave at once (a network blip, before they come back): a
    handful of DELETEs, not one each, and every row gone."""
    limits = await started(pool, per_tenant=200)
    statements: list[str] = []
    execute = limits._db.execute

    async def counted(query: str, *args: object) -> str:
        statements.append(query)
        return await execute(query, *args)

    monkeypatch.setattr(limits._db, "execute", counted)
    leave = asyncio.Event()
    held = 0

    async def connect() -> None:
        nonlocal held
        async with limits.hold("sse", "t1"):
            held += 1
            await leave.wait()

    tasks = [asyncio.create_task(connect()) for _ in range(200)]
    await until(lambda: held == 200)
    assert await rows(pool) == 200
    leave.set()
    await asyncio.gather(*tasks)
    assert await rows(pool) == 0 and limits.total == 0
    releases = [q for q in statements if "DELETE FROM stream_connections" in q]
    assert 1 <= len(releases) <= 5, len(releases)


async def test_a_batch_updates_each_tenants_counter_once(pool: asyncpg.Pool) -> None:
    """Admitting or releasing a batch touches each tenant's counter row once, not once per
    connection: the same row updated in one statement a thousand times made every later
    look at it walk the versions before, and admission slowed down with the batch's size
    (migration 0013)."""
    limits = await started(pool)  # its process's row; the statement's limit is 500
    ids = list(range(1, 1001))
    tenants = ["t1"] * 600 + ["t2"] * 400
    async with pool.acquire() as conn, conn.transaction():

        async def counter_writes() -> int:
            return int(
                await conn.fetchval(
                    "SELECT n_tup_ins + n_tup_upd FROM pg_stat_xact_user_tables"
                    " WHERE relname = 'stream_tenant_counts'"
                )
            )

        admitted = await conn.fetch(
            limits_module.Q["admit_connections"],
            limits.process_id,
            ids,
            tenants,
            ["sse"] * 1000,
            500,
        )
        assert sorted(r["connection_id"] for r in admitted) == [*range(1, 501), *range(601, 1001)]
        assert await counter_writes() == 2  # one per tenant
        await conn.execute(limits_module.Q["release_connections"], limits.process_id, ids)
        assert await counter_writes() == 4
        counts = await conn.fetch(
            "SELECT tenant_id, connections FROM stream_tenant_counts ORDER BY tenant_id"
        )
        assert [tuple(r) for r in counts] == [("t1", 0), ("t2", 0)]


async def test_a_stream_ended_by_a_drain_has_freed_its_slot_when_it_closes(
    pool: asyncpg.Pool,
) -> None:
    """The review of 3cffe92: once draining, a stream's slot was released in the
    background after its close, so a client reconnecting at once to another process was
    counted against its own old slot and refused (95 of 100 in the reviewer's runs).
    With a database that answers, the close waits for the release (a moment at most)."""
    a, b = await started(pool, per_tenant=5), await started(pool, per_tenant=5)
    try:
        for _ in range(20):
            async with contextlib.AsyncExitStack() as held:
                for _ in range(5):
                    await held.enter_async_context(a.hold("sse", "t1"))
                a.drain()
            # Closed: each client comes straight back, to the other process.
            async with contextlib.AsyncExitStack() as back:
                for _ in range(5):
                    await back.enter_async_context(b.hold("sse", "t1"))
            a._draining = False  # the next round drains again
    finally:
        await a.stop()
        await b.stop()
