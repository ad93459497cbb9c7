"""Connection limits shared by every stream kind: per process, and per tenant across the cluster.

The per-process limit is counted here, in memory. The per-tenant limit holds
for all the processes that share the database: each process records its open
connections in ``stream_connections`` under a lease on its row in
``stream_processes``, which it renews every ``ttl_s / 3`` seconds. Admission
counts the tenant's connections of processes whose lease is still valid, under
a per-tenant advisory lock, and inserts its own row in the same statement.
Triggers keep one counter per process and tenant, so admission costs the same
at the ten-thousandth connection as at the first.

A process that crashes stops renewing: its connections stop counting at most
``ttl_s`` (default 15 s) after its last renewal, that is within ``ttl_s`` of
the crash. A clean shutdown deletes its rows at once. A process that was only
slow (stalled, or cut off from the database, for longer than ``ttl_s``) finds its
lease lapsed at its next renewal: meanwhile other processes may have admitted the
tenant's connections up to the limit, so its own go through admission again, oldest
first, and those the limit leaves no room for are ended (``hold``'s ``end``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg

from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.queries import load_queries
from pulse.errors import CONNECTION_LIMIT, ErrorCode
from pulse.logs import Throttled

log = logging.getLogger(__name__)
Q = load_queries(__package__)

DEFAULT_TTL_S = 15.0
# Shutting down, a stream's close waits this long at most for its slot's release.
DRAIN_RELEASE_WAIT_S = 0.5
STREAM_KINDS = ("websocket", "sse", "legacy_v2")  # the status endpoint's and the metrics'
# How long a tenant's count, once read, answers ``check`` without a query, and for
# how many tenants at most.
CHECK_FRESH_S = 1.0
CHECK_TENANTS = 10_000


class LimitReached(Exception):
    pass


# An admission waiting for its statement: connection id, tenant, kind, its answer.
_Pending = tuple[int, str, str, "asyncio.Future[bool]"]


class ConnectionLimits:
    def __init__(
        self, db: Database, max_total: int, max_per_tenant: int, *, ttl_s: float = DEFAULT_TTL_S
    ) -> None:
        self._db = db
        self.max_total = max_total
        self.max_per_tenant = max_per_tenant
        self.ttl_s = ttl_s
        self.process_id = uuid.uuid4()
        # Open connections of this process, by kind (the status endpoint's counts).
        self.by_kind: collections.Counter[str] = collections.Counter()
        # Every connection of this process from the start of its admission on:
        # id -> (tenant, kind). The table mirrors it; renewals repair drift.
        self._open: dict[int, tuple[str, str]] = {}
        self._admitting: set[int] = set()  # in _open, not yet admitted
        self._enders: dict[int, Callable[[ErrorCode], None]] = {}  # how to end an open one
        self._ids = itertools.count(1)
        self._newest_id = 0
        # Admissions waiting for the next statement, and the task that runs them.
        self._pending: list[_Pending] = []
        self._admitter: asyncio.Task[None] | None = None
        # Releases waiting for the next statement, and the task that runs them.
        self._releasing: list[tuple[int, asyncio.Future[None]]] = []
        self._releaser: asyncio.Task[None] | None = None
        # Shutting down (drain): a stream that ends releases its slot in the background.
        self._draining = False
        self._released_later: set[asyncio.Task[None]] = set()
        # tenant -> [when its count was read, the count since]: check's hint.
        self._known: dict[str, list[float]] = {}
        self._reading: dict[str, asyncio.Future[list[float]]] = {}  # reads in flight

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    async def start(self) -> None:
        """Register this process; from now on its connections count cluster-wide."""
        await self.renew()

    def drain(self) -> None:
        """Shutting down: from now on a stream that ends is closed at once, its slot
        released in the background. Every stream ends now, and its close must not wait
        for a statement: a database that stopped answering would hold each one until
        the shutdown's time is up, then cut it. ``stop`` forgets them all anyway, and
        should that not get through either, this process's lease lapses within
        ``ttl_s``."""
        self._draining = True

    async def stop(self) -> None:
        """Forget this process and its connections (a clean shutdown)."""
        try:
            await self._db.execute(Q["forget_process"], self.process_id)
        except DatabaseUnavailable as exc:
            log.warning("could not unregister the stream connections of this process: %s", exc)

    async def keep_alive(self) -> None:
        """Renew the lease for as long as the task lives (run by the Supervisor)."""
        unavailable = Throttled(log)  # a line per 10 s of an outage
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.renew()
            except DatabaseUnavailable as exc:
                unavailable.warning("cannot renew the stream connection lease: %s", exc)

    async def renew(self) -> None:
        db = self._db
        open_now = dict(self._open)
        admitted = {id_: v for id_, v in open_now.items() if id_ not in self._admitting}
        newest = self._newest_id
        created, lapsed = await db.fetchrow(
            Q["renew_process"], self.process_id, _describe_process(), self.ttl_s
        )
        if lapsed and admitted:
            await self._admit_again(admitted, open_now, newest)
        elif not created:
            await db.execute(Q["delete_strays"], self.process_id, list(open_now), newest)
        await db.execute(Q["delete_expired_processes"])

    async def _admit_again(
        self,
        admitted: dict[int, tuple[str, str]],
        open_now: dict[int, tuple[str, str]],
        newest: int,
    ) -> None:
        """The lease had lapsed: the connections open here went uncounted, and other
        processes may have filled the tenants' limits meanwhile. Admit them again, oldest
        first, and end those there is no room for (their clients reconnect, and are
        admitted or refused as any new connection)."""
        ids = sorted(admitted)
        async with self._db.transaction() as conn:
            await conn.execute(Q["delete_strays"], self.process_id, list(open_now), newest)
            await conn.execute(Q["release_connections"], self.process_id, ids)
            rows = await conn.fetch(
                Q["admit_connections"],
                self.process_id,
                ids,
                [admitted[i][0] for i in ids],
                [admitted[i][1] for i in ids],
                self.max_per_tenant,
            )
        kept = {row["connection_id"] for row in rows}
        over = [i for i in ids if i not in kept]
        if over:
            log.warning(
                "this process's stream lease had lapsed and other processes admitted "
                "connections meanwhile: ending %d of its streams over their tenant's limit",
                len(over),
            )
        for connection_id in over:
            end = self._enders.pop(connection_id, None)
            if end is not None:
                end(CONNECTION_LIMIT)

    async def check(self, tenant_id: str) -> None:
        """Raise LimitReached when one more connection for ``tenant_id`` would be too many.

        A hint for answering before a stream starts (SSE's 429); only ``hold``
        reserves the slot. A count below the limit, once read, is kept for
        CHECK_FRESH_S with this process's admissions and releases applied to it: a
        burst of reconnects asks the database once per tenant, and the answer is exact
        for one process. Other processes' admissions meanwhile are seen at the next
        read (``hold`` enforces the limit whatever the hint said); a count at the limit
        is read again every time, so a slot freed anywhere is seen at once.
        """
        self._check_process()
        known = self._known.get(tenant_id)
        stale = known is None or time.monotonic() - known[0] >= CHECK_FRESH_S
        if stale or known is None or known[1] >= self.max_per_tenant:
            reading = self._reading.get(tenant_id)
            if reading is None:  # else join it: one read for the checks that wait on it
                reading = asyncio.ensure_future(self._read_count(tenant_id))
                # Every check waiting on it may have gone (clients that left): its
                # failure is then nobody's to read, and is not an error to log.
                reading.add_done_callback(lambda f: f.cancelled() or f.exception())
                self._reading[tenant_id] = reading
            known = await asyncio.shield(reading)
        if known[1] >= self.max_per_tenant:
            raise LimitReached("This tenant has reached its connection limit.")

    async def _read_count(self, tenant_id: str) -> list[float]:
        try:
            read_at = time.monotonic()
            count = await self._db.fetchval(Q["count_tenant_connections"], tenant_id)
            if len(self._known) >= CHECK_TENANTS:
                self._known.clear()
            known = self._known[tenant_id] = [read_at, count]
            return known
        finally:
            del self._reading[tenant_id]

    def _counted(self, tenant_id: str, change: int) -> None:
        known = self._known.get(tenant_id)
        if known is not None:
            known[1] += change

    @contextlib.asynccontextmanager
    async def hold(
        self, kind: str, tenant_id: str, *, end: Callable[[ErrorCode], None] | None = None
    ) -> AsyncIterator[None]:
        """Count one connection of ``kind`` for ``tenant_id`` while the block runs.

        Raises LimitReached when the process or the tenant is at its limit, and
        DatabaseUnavailable when the count cannot be read. ``end`` is called with
        CONNECTION_LIMIT should the limit find no room for the connection after this
        process's lease lapsed (``renew``): it ends the stream, whose block then runs to
        its end as usual.
        """
        db = self._db
        self._check_process()
        connection_id = next(self._ids)
        self._newest_id = connection_id
        self._open[connection_id] = (tenant_id, kind)
        self._admitting.add(connection_id)
        try:
            admitted = await self._admit(db, connection_id, tenant_id, kind)
        except asyncio.CancelledError:
            # The client went away during admission, which may have been recorded.
            del self._open[connection_id]
            await asyncio.shield(self._release(db, connection_id))
            raise
        except BaseException:
            del self._open[connection_id]
            raise
        finally:
            self._admitting.discard(connection_id)
        if not admitted:
            del self._open[connection_id]
            raise LimitReached("This tenant has reached its connection limit.")
        self.by_kind[kind] += 1
        self._counted(tenant_id, 1)
        if end is not None:
            self._enders[connection_id] = end
        try:
            yield
        finally:
            self.by_kind[kind] -= 1
            self._counted(tenant_id, -1)
            del self._open[connection_id]
            self._enders.pop(connection_id, None)
            if self._draining:
                # Waited for a moment: a client that reconnects at once to another
                # process finds its slot free (a healthy database answers within
                # milliseconds); not longer: a frozen one must not hold the close.
                release = self._release_later(db, connection_id)
                await asyncio.wait({release}, timeout=DRAIN_RELEASE_WAIT_S)
            else:
                # Shielded: a cancelled stream (its client went away) still frees its
                # slot. Awaited: a client that reconnects once closed finds it free.
                await asyncio.shield(self._release(db, connection_id))

    def _release_later(self, db: Database, connection_id: int) -> asyncio.Task[None]:
        """Release the connection in the background (shutting down: ``drain``)."""
        task = asyncio.get_running_loop().create_task(self._release(db, connection_id))
        self._released_later.add(task)
        task.add_done_callback(self._released_later.discard)
        # Its failure is said by _release_pending, or is the shutdown's own (cancelled).
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return task

    async def _admit(self, db: Database, connection_id: int, tenant_id: str, kind: str) -> bool:
        """Admitted or not, with the connections that arrive meanwhile: one statement for
        all of them, while the one before it runs (a burst of reconnects is a few round
        trips, not one per connection)."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((connection_id, tenant_id, kind, future))
        if self._admitter is None or self._admitter.done():
            self._admitter = asyncio.create_task(self._admit_pending(db))
        return await future

    async def _admit_pending(self, db: Database) -> None:
        while self._pending:
            batch = sorted(self._pending, key=lambda p: (p[1], p[0]))
            self._pending = []
            try:
                admitted = await self._admit_batch(db, batch)
            except BaseException as exc:
                failure = exc if isinstance(exc, Exception) else DatabaseUnavailable("stopped")
                for *_, future in batch + (self._pending if failure is not exc else []):
                    if not future.done():
                        future.set_exception(failure)
                if failure is not exc:
                    raise
                continue
            gone = []
            for connection_id, _tenant, _kind, future in batch:
                if not future.done():
                    future.set_result(admitted[connection_id])
                elif admitted[connection_id]:
                    gone.append(connection_id)
            # Their clients went away meanwhile: hold() released them, maybe before this
            # insert; release them again, now that they are there.
            await asyncio.gather(*(self._release(db, c) for c in gone))

    async def _admit_batch(self, db: Database, batch: list[_Pending]) -> dict[int, bool]:
        args = (
            self.process_id,
            [p[0] for p in batch],
            [p[1] for p in batch],
            [p[2] for p in batch],
            self.max_per_tenant,
        )
        try:
            rows = await db.fetch(Q["admit_connections"], *args)
        except asyncpg.ForeignKeyViolationError:
            # This process's lease lapsed (the database was away for longer than
            # ttl_s) and another process cleared it: register again first.
            await self.renew()
            rows = await db.fetch(Q["admit_connections"], *args)
        admitted = {row["connection_id"] for row in rows}
        return {p[0]: p[0] in admitted for p in batch}

    async def _release(self, db: Database, connection_id: int) -> None:
        """Delete the connection's row, with the releases that come meanwhile: one
        statement for all of them, as for admissions (clients that leave together,
        before they come back, are a few round trips too)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._releasing.append((connection_id, future))
        if self._releaser is None or self._releaser.done():
            self._releaser = asyncio.create_task(self._release_pending(db))
        await future

    async def _release_pending(self, db: Database) -> None:
        while self._releasing:
            batch, self._releasing = self._releasing, []
            try:
                await db.execute(Q["release_connections"], self.process_id, [c for c, _ in batch])
            except DatabaseUnavailable as exc:
                # The next renewal deletes the rows (delete_strays).
                log.warning("could not release %d stream connections now: %s", len(batch), exc)
            except Exception as exc:
                for _, future in batch:
                    if not future.done():  # each one's, as its own statement's would be
                        future.set_exception(exc)
                continue
            except BaseException:
                for _, future in batch + self._releasing:
                    future.cancel()  # the server is stopping: so are the streams
                raise
            for _, future in batch:
                if not future.done():  # a caller cancelled (an admission stopped) is done
                    future.set_result(None)

    def _check_process(self) -> None:
        # Connections still being admitted count too, so a burst cannot overshoot.
        if len(self._open) >= self.max_total:
            raise LimitReached("This server has reached its connection limit.")


def _describe_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"
