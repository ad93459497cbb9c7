"""Group commit: concurrent single readings of a tenant share a transaction; none is
acknowledged before its transaction commits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime

import asyncpg

from pulse.db.errors import DatabaseUnavailable
from pulse.errors import INVALID_DEVICE_TOKEN
from pulse.ingest.model import Accepted, Device, Rejected, Submission
from pulse.ingest.validation import Reading
from pulse.ingest.writer import CHECK_AHEAD_FROM, TelemetryWriter, Written
from tests.ingest.conftest import stored_rows
from tests.support import provision_device, seam, until

NOW = datetime(2026, 11, 27, 17, 0, tzinfo=UTC)


def one(token: str, value: float) -> list[Submission]:
    return [Submission("t1", "dev-1", token, Reading(NOW, {"v": value}, None))]


def held_first(sizes: list[int]) -> tuple[Callable[..., Awaitable[None]], asyncio.Event]:
    """A hook that records each transaction's size and holds the first one open until
    the returned event is set: whatever queues meanwhile forms the next group."""
    release = asyncio.Event()

    async def hook(conn: asyncpg.Connection, written: Written) -> None:
        sizes.append(sum(len(rows.readings) for rows in written.rows.values()))
        if len(sizes) == 1:
            await release.wait()

    return hook, release


async def each_has_queued() -> None:
    """Let the writes just started take their first step, which queues them: a write's
    task first runs on the loop's next turn, and runs until it waits for its answer."""
    await asyncio.sleep(0)


async def test_concurrent_writes_share_transactions(pool: asyncpg.Pool, token: str) -> None:
    sizes: list[int] = []
    hold, release = held_first(sizes)
    writer = TelemetryWriter(seam(pool), hooks=[hold])
    first = asyncio.ensure_future(writer.write(one(token, 0)))
    try:
        await until(lambda: len(sizes) == 1)  # the first transaction is open
        rest = asyncio.gather(*(writer.write(one(token, i)) for i in range(1, 40)))
        await each_has_queued()
    finally:
        release.set()  # else a failure above leaves a transaction open, and teardown waits
    outcomes = [await asyncio.wait_for(first, 10), *await asyncio.wait_for(rest, 10)]
    ids = sorted(o[0].event_id for o in outcomes if isinstance(o[0], Accepted))  # type: ignore[type-var]
    assert ids == list(range(1, 41))
    assert sizes == [1, 39]
    # Each caller got the id of its own reading.
    rows = dict(await pool.fetch("SELECT (metrics->>'v')::int, id FROM telemetry"))
    assert all(rows[i] == o[0].event_id for i, o in enumerate(outcomes))  # type: ignore[union-attr]


async def test_concurrent_writes_for_the_same_tenants_share_transactions(
    pool: asyncpg.Pool, token: str
) -> None:
    """A batch naming two tenants groups with the batches naming the same two."""
    other = await provision_device(pool, "t2", "dev-1")
    sizes: list[int] = []
    hold, release = held_first(sizes)

    def both(value: int) -> list[Submission]:
        return [
            Submission("t1", "dev-1", token, Reading(NOW, {"v": value}, None)),
            Submission("t2", "dev-1", other, Reading(NOW, {"v": value}, None)),
        ]

    writer = TelemetryWriter(seam(pool), hooks=[hold])
    first = asyncio.ensure_future(writer.write(both(0)))
    try:
        await until(lambda: len(sizes) == 1)
        rest = asyncio.gather(*(writer.write(both(i)) for i in range(1, 20)))
        await each_has_queued()
    finally:
        release.set()
    outcomes = [await asyncio.wait_for(first, 10), *await asyncio.wait_for(rest, 10)]
    assert sizes == [2, 38]
    rows = {
        (row["tenant_id"], row["v"]): row["id"]
        for row in await pool.fetch(
            "SELECT tenant_id, (metrics->>'v')::int AS v, id FROM telemetry"
        )
    }
    for i, (first, second) in enumerate(outcomes):
        assert (first, second) == (Accepted(rows["t1", i]), Accepted(rows["t2", i]))
    for tenant in ("t1", "t2"):
        assert sorted(v for (t, _), v in rows.items() if t == tenant) == list(range(1, 21))


async def test_without_group_commit_each_write_is_its_own_transaction(
    pool: asyncpg.Pool, token: str
) -> None:
    sizes: list[int] = []

    async def count(conn: asyncpg.Connection, written: Written) -> None:
        sizes.append(sum(len(rows.readings) for rows in written.rows.values()))

    writer = TelemetryWriter(seam(pool), hooks=[count], group_commit=False)
    await asyncio.gather(*(writer.write(one(token, i)) for i in range(10)))
    assert sizes == [1] * 10


async def test_no_acknowledgement_before_commit(pool: asyncpg.Pool, token: str) -> None:
    """The connection dies between the insert and the commit: every caller of that
    group gets an error, nothing is stored, and later writes work."""
    armed = True

    async def die_before_commit(conn: asyncpg.Connection, written: Written) -> None:
        nonlocal armed
        if armed:
            # The other writes queued behind this transaction before it got here
            # (each queues at its first step; this one has been to the database).
            armed = False
            await conn.execute("SELECT pg_terminate_backend(pg_backend_pid())")

    writer = TelemetryWriter(seam(pool), hooks=[die_before_commit])
    results = await asyncio.gather(
        *(writer.write(one(token, i)) for i in range(20)), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    acknowledged = [r[0].event_id for r in results if not isinstance(r, BaseException)]  # type: ignore[index, union-attr]
    assert failed, "the killed transaction's callers must see an error"
    assert all(isinstance(r, DatabaseUnavailable) for r in failed), failed
    # What was acknowledged is exactly what is stored.
    stored = [r["id"] for r in await pool.fetch("SELECT id FROM telemetry ORDER BY id")]
    assert sorted(acknowledged) == stored
    assert await stored_rows(pool) == len(acknowledged) == 20 - len(failed)
    after = await writer.write(one(token, 99))
    assert isinstance(after[0], Accepted)


def many(token: str, first: int) -> list[Submission]:
    """A write large enough to be checked before it queues (CHECK_AHEAD_FROM messages)."""
    return [one(token, first + i)[0] for i in range(CHECK_AHEAD_FROM)]


async def test_a_large_write_is_checked_while_the_group_ahead_commits(
    pool: asyncpg.Pool, token: str
) -> None:
    """Its tokens are checked outside the tenant's gate: a batch with a wrong token
    is answered while another transaction of the tenant is still open."""
    release = asyncio.Event()
    inside = asyncio.Event()

    async def hold(conn: asyncpg.Connection, written: Written) -> None:
        inside.set()
        await release.wait()

    writer = TelemetryWriter(seam(pool), hooks=[hold])
    first = asyncio.create_task(writer.write(one(token, 0)))
    try:
        await asyncio.wait_for(inside.wait(), 5)
        refused = await asyncio.wait_for(writer.write(many("pdt_wrong", 1)), 5)
        assert not first.done()
    finally:
        release.set()
    assert {type(o) for o in refused} == {Rejected}
    assert {o.reason for o in refused if isinstance(o, Rejected)} == {INVALID_DEVICE_TOKEN}
    assert isinstance((await first)[0], Accepted)


async def test_checked_and_unchecked_writes_share_a_group(pool: asyncpg.Pool, token: str) -> None:
    """Single readings (checked inside the transaction) and large writes (checked
    before) commit together, and each caller gets its own outcomes."""
    sizes: list[int] = []
    hold, release = held_first(sizes)
    admitted = 0

    def admit(counts: Mapping[Device, int]) -> dict[Device, tuple[int, Rejected]]:
        nonlocal admitted
        admitted += sum(counts.values())  # the messages that authenticate
        return {}

    writer = TelemetryWriter(seam(pool), hooks=[hold], admit=admit)
    first = asyncio.ensure_future(writer.write(one(token, 9999)))
    await until(lambda: len(sizes) == 1)  # the first transaction is open
    # A second is in flight beside it (it inserts, then waits for the first to end):
    # the next group starts only when the first has ended.
    second = asyncio.ensure_future(writer.write(one(token, 9998)))
    await until(lambda: writer.ids.foreseen == 1)
    singles = [writer.write(one(token if i % 2 else "pdt_wrong", 1000 + i)) for i in range(10)]
    batches = [writer.write(many(token, 100 * b)) for b in range(3)]
    writes = asyncio.gather(*singles, *batches)
    # The first transaction holds while the large writes are checked beside it.
    try:
        await until(lambda: admitted == 2 + 3 * CHECK_AHEAD_FROM)
        for _ in range(10):  # a checked write queues a few turns of the loop after its check
            await asyncio.sleep(0)
    finally:
        release.set()
    results = [await asyncio.wait_for(first, 10), *await asyncio.wait_for(writes, 10)]
    assert isinstance((await second)[0], Accepted)
    rows = dict(await pool.fetch("SELECT (metrics->>'v')::int, id FROM telemetry"))
    for i, outcome in enumerate(results[1:11]):
        assert outcome == ([Accepted(rows[1000 + i])] if i % 2 else outcome)
        if not i % 2:
            assert isinstance(outcome[0], Rejected) and outcome[0].reason == INVALID_DEVICE_TOKEN
    for b, outcomes in enumerate(results[11:]):
        assert outcomes == [Accepted(rows[100 * b + i]) for i in range(CHECK_AHEAD_FROM)]
    assert sum(sizes) == len(rows) == 2 + 5 + 3 * CHECK_AHEAD_FROM
    # Behind the two transactions in flight, everything that queued went in one group.
    assert len(sizes) == 3, sizes


async def test_a_write_for_overlapping_tenants_is_not_starved(
    pool: asyncpg.Pool, token: str
) -> None:
    """A group for t1 takes t1's gate for its own transaction only: a write for t1 and
    t2 that queued at the gate meanwhile commits before the next group for t1."""
    other = await provision_device(pool, "t2", "dev-1")
    order: list[list[str]] = []
    release = asyncio.Event()

    async def hook(conn: asyncpg.Connection, written: Written) -> None:
        order.append(sorted(written.rows))
        if len(order) == 1:
            await release.wait()

    writer = TelemetryWriter(seam(pool), hooks=[hook])
    first = asyncio.ensure_future(writer.write(one(token, 0)))
    try:
        await until(lambda: len(order) == 1)  # t1's first transaction is open
        both = asyncio.ensure_future(
            writer.write(
                [
                    Submission("t1", "dev-1", token, Reading(NOW, {"v": 1}, None)),
                    Submission("t2", "dev-1", other, Reading(NOW, {"v": 1}, None)),
                ]
            )
        )
        await each_has_queued()  # the write for t1 and t2 waits at t1's gate
        again = asyncio.ensure_future(writer.write(one(token, 2)))  # t1's next group
        await each_has_queued()
    finally:
        release.set()
    await asyncio.wait_for(asyncio.gather(first, both, again), 10)
    assert order == [["t1"], ["t1", "t2"], ["t1"]]
