"""The device status sweeper: moves stored statuses as time passes the thresholds.

Ingest marks a device ONLINE whenever it is seen; only the passing of time
makes it STALE and then OFFLINE, and that is this loop's work. Exactly one
process of a cluster sweeps: the one holding a session-level advisory lock on
its own connection. The others keep asking, on a pooled connection
(pulse.db.leadership); when the leader's process dies, its connection closes,
PostgreSQL releases the lock, and the next try of another process takes over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from datetime import datetime

import asyncpg

from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.leadership import lock_is_free
from pulse.db.pool import POOL_NAME
from pulse.db.queries import load_queries
from pulse.logs import Throttled

log = logging.getLogger(__name__)

Q = load_queries(__package__)

# Any constant the processes of a cluster share (advisory locks are per database).
SWEEPER_LOCK_KEY = 0x70756C73_65_7377  # "pulse" "sw"
NO_HEARTBEAT_SEVERITY = 3
APPLICATION_NAME = "pulse sweeper"  # shows in pg_stat_activity, as "pulse rollups" does
QUERY_TIMEOUT_S = 10.0
# Devices moved per statement at most; a sweep repeats the statement until fewer move.
SWEEP_BATCH = 5000
# A sweeper that takes the lead within this long of the last sweep carries on from it:
# the lock is free once the leader's connection closes (at once when its process ends,
# within about 8 s when its machine vanishes: pulse.db.database.DEDICATED_KEEPALIVES,
# within about 16 s when it hangs: DEDICATED_SILENCE_S), and the others try every
# interval. After a longer gap, the servers were away.
HANDOVER_S = 30.0

# The time to judge last_seen_at by; None means the database's clock, the one
# ingest stamps last_seen_at with. Tests pass their own.
Clock = Callable[[], datetime | None]


@dataclasses.dataclass(frozen=True)
class Swept:
    stale: int
    offline: int
    alerts_opened: int
    # A session whose writes wait for a lock (see sweep_statuses), in words, and when
    # the pass held the statuses for it (silence counts from then).
    waiter: str | None = None
    held_at: datetime | None = None


async def sweep_statuses(
    conn: asyncpg.Connection,
    *,
    stale_after_s: float,
    offline_after_s: float,
    now: datetime | None = None,
    since: datetime | None = None,
    batch: int = SWEEP_BATCH,
    stall_after_s: float | None = None,
    may_hold: bool = True,
    pool_name: str | None = POOL_NAME,
) -> Swept:
    """One set-based pass over every device of every tenant, in statements of at most
    ``batch`` devices moved; silence before ``since`` (when sweeping began) is not
    counted.

    Nothing moves (with ``may_hold``) while a session of Pulse's pool (application_name
    ``pool_name``; None: any of the database's user) has waited more than
    ``stall_after_s`` for a lock on a row, a transaction or a table: an operations
    audit held a tenant's row for 30 s, and every device went STALE with a NO_HEARTBEAT
    alert, each closed 0.6 s after the lock's end, when the readings that had waited
    were written. The pass says which session waits (``waiter``), and when it held the
    statuses for it (``held_at``), from which silence then counts."""
    if stall_after_s is None:
        stall_after_s = default_stall(stale_after_s)
    stale = offline = alerts_opened = 0
    while True:
        row = await conn.fetchrow(
            Q["sweep_statuses"],
            now,
            stale_after_s,
            offline_after_s,
            NO_HEARTBEAT_SEVERITY,
            since,
            batch,
            stall_after_s,
            may_hold,
            pool_name,
            timeout=QUERY_TIMEOUT_S,
        )
        stale += row["stale"]
        offline += row["offline"]
        alerts_opened += row["alerts_opened"]
        if row["held_at"] is not None or row["stale"] + row["offline"] < batch:
            return Swept(stale, offline, alerts_opened, row["waiter"], row["held_at"])


def default_interval(stale_after_s: float) -> float:
    """Often enough that a status is at most a small part of a threshold late."""
    return max(0.05, min(1.0, stale_after_s / 10))


def default_stall(stale_after_s: float) -> float:
    """How long a session may wait for a lock before the sweeper takes Pulse's writes to
    be stuck: far longer than writes wait on each other (a tenant's writes take turns on
    its row), well within a threshold, so that it is seen before the devices whose
    readings wait would be taken for silent."""
    return max(1.0, min(5.0, stale_after_s / 4))


@dataclasses.dataclass
class _Hold:
    """Statuses held for sessions waiting for locks: since when, and the last wait seen
    (the sweeper's process clock)."""

    began: float | None = None
    waited_at: float = 0.0
    ended: bool = False  # by its length, the waits going on


class StatusSweeper:
    def __init__(
        self,
        db: Database,
        *,
        stale_after_s: float,
        offline_after_s: float,
        interval_s: float | None = None,
        clock: Clock = lambda: None,
        lock_key: int = SWEEPER_LOCK_KEY,
        forgive_downtime: bool = True,
    ) -> None:
        self._db = db
        self._stale_after_s = stale_after_s
        self._unavailable = Throttled(log)  # a line per 10 s of an outage
        self._offline_after_s = offline_after_s
        self.interval_s = interval_s or default_interval(stale_after_s)
        self._clock = clock
        self._lock_key = lock_key
        # Not blaming devices for the servers' own absence: when this sweeper takes
        # the lead after a gap in sweeping (an outage), a device's silence is counted
        # from then at the earliest, so a restart after a long outage does not open a
        # NO_HEARTBEAT alert for every device seconds before it reports again. A
        # takeover within ``handover_s`` of the last sweep carries on from it.
        self._forgive_downtime = forgive_downtime
        self.handover_s = max(HANDOVER_S, 5 * self.interval_s)
        # Statuses are held for a wait for a lock (sweep_statuses) for at most this long:
        # past that it is an incident of its own, and silent devices are said again,
        # whatever the reason (a session left idle in a transaction holding a tenant's
        # row would otherwise keep every dead device ONLINE for as long).
        self.hold_at_most_s = offline_after_s
        self._held = Throttled(log)  # a line per 10 s at most, however the waits come
        # Kept across this process's leads (it leads again after a database error); a
        # hold carried to another process (counts_from) is counted there from its start.
        self._hold = _Hold()
        # The pool's application_name, by which its sessions are told (pulse.db.pool).
        self._pool_name = None if "application_name=" in db.dsn else POOL_NAME
        self.leading = asyncio.Event()
        self.sweeps = 0
        self.rounds = 0  # lock attempts and sweeps
        self._round_done = asyncio.Condition()

    async def run(self) -> None:
        """Follow until the lock is free, then sweep until the connection is lost; forever.
        A follower holds no connection of its own (pulse.db.leadership)."""
        while True:
            try:
                if await lock_is_free(self._db, self._lock_key, timeout=QUERY_TIMEOUT_S):
                    # Closing the connection (at the end of the block) releases the lock.
                    async with self._db.dedicated(
                        APPLICATION_NAME, timeout=QUERY_TIMEOUT_S
                    ) as conn:
                        await self._lead(conn)
                else:
                    await self._round_finished()
            except DatabaseUnavailable as exc:
                self._unavailable.warning(
                    "status sweeper: the database is unavailable (%s); retrying", exc
                )
            finally:
                if self.leading.is_set():
                    log.info("this process no longer sweeps device statuses")
                self.leading.clear()
            await asyncio.sleep(self.interval_s)

    async def _lead(self, conn: asyncpg.Connection) -> None:
        if not await conn.fetchval(Q["try_lead_sweeper"], self._lock_key, timeout=QUERY_TIMEOUT_S):
            await self._round_finished()  # another process took it first: follow again
            return
        since = None
        if self._forgive_downtime:
            since = await conn.fetchval(
                Q["take_over_sweeping"], self._clock(), self.handover_s, timeout=QUERY_TIMEOUT_S
            )
        self.leading.set()
        log.info("this process now sweeps device statuses")
        hold = self._hold
        while True:
            now = time.monotonic()
            may_hold = (
                hold.began is None
                or now - hold.waited_at >= self._stale_after_s  # that one ended: a new one
                or now - hold.began < self.hold_at_most_s
            )
            swept = await sweep_statuses(
                conn,
                stale_after_s=self._stale_after_s,
                offline_after_s=self._offline_after_s,
                now=self._clock(),
                since=since,
                may_hold=may_hold,
                pool_name=self._pool_name,
            )
            self.sweeps += 1
            if swept.held_at is not None:
                since = swept.held_at if since is None else max(since, swept.held_at)
            self._follow_hold(hold, swept)
            if swept.stale or swept.offline:
                log.info(
                    "device statuses: %d now STALE, %d now OFFLINE, %d NO_HEARTBEAT alerts",
                    swept.stale,
                    swept.offline,
                    swept.alerts_opened,
                )
            await self._round_finished()
            await asyncio.sleep(self.interval_s)

    def _follow_hold(self, hold: _Hold, swept: Swept) -> None:
        """Keep and say a hold (sweep_statuses) as it begins, lasts and ends. It ends once
        no session has waited for a threshold (PULSE_STALE_AFTER_S): waits that come and
        go make one hold, which lasts at most ``hold_at_most_s`` in all."""
        now = time.monotonic()
        if swept.waiter is None:
            if hold.began is not None and now - hold.waited_at >= self._stale_after_s:
                if not hold.ended:  # else said when it did
                    log.info("device statuses move again: no session of Pulse's waits any more")
                hold.began = None
            return
        if hold.began is None or now - hold.waited_at >= self._stale_after_s:
            hold.began, hold.ended = now, False  # a new hold (the last ended unseen)
        hold.waited_at = now
        if swept.held_at is not None:
            self._held.warning(
                "device statuses held: %s, so devices whose readings wait are not taken "
                "for silent; their silence counts from when writes go through again",
                swept.waiter,
            )
        elif not hold.ended:
            hold.ended = True
            log.warning(
                "device statuses move again although %s: they were held for %g s, the "
                "longest allowed (PULSE_OFFLINE_AFTER_S)",
                swept.waiter,
                self.hold_at_most_s,
            )

    async def _round_finished(self) -> None:
        self.rounds += 1
        async with self._round_done:
            self._round_done.notify_all()

    async def wait_rounds(self, rounds: int) -> None:
        """Until this sweeper has finished ``rounds`` rounds (lock attempts or sweeps) in all."""
        async with self._round_done:
            await self._round_done.wait_for(lambda: self.rounds >= rounds)
