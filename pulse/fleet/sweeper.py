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
from collections.abc import Callable
from datetime import datetime

import asyncpg

from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.leadership import lock_is_free
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
    # When the pass found Pulse's writes stuck behind a lock, and so moved nothing
    # (see sweep_statuses); silence counts from then.
    stalled_at: datetime | None = None


async def sweep_statuses(
    conn: asyncpg.Connection,
    *,
    stale_after_s: float,
    offline_after_s: float,
    now: datetime | None = None,
    since: datetime | None = None,
    batch: int = SWEEP_BATCH,
    stall_after_s: float | None = None,
) -> Swept:
    """One set-based pass over every device of every tenant, in statements of at most
    ``batch`` devices moved; silence before ``since`` (when sweeping began) is not
    counted.

    Nothing moves while a statement of Pulse's (of the database's user) has waited more
    than ``stall_after_s`` for a lock: an operations audit held a lock on a tenant's row
    for 30 s, and every device went STALE with a NO_HEARTBEAT alert, each closed 0.6 s
    after the lock's end, when the readings that had waited were written. The pass
    says when it found that (``stalled_at``), from which silence then counts."""
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
            timeout=QUERY_TIMEOUT_S,
        )
        stale += row["stale"]
        offline += row["offline"]
        alerts_opened += row["alerts_opened"]
        if row["stalled_at"] is not None or row["stale"] + row["offline"] < batch:
            return Swept(stale, offline, alerts_opened, row["stalled_at"])


def default_interval(stale_after_s: float) -> float:
    """Often enough that a status is at most a small part of a threshold late."""
    return max(0.05, min(1.0, stale_after_s / 10))


def default_stall(stale_after_s: float) -> float:
    """How long a write of Pulse's may wait for a lock before the sweeper takes the
    writes to be stuck: far longer than writes wait on each other (a tenant's writes
    take turns on its row), well within a threshold, so that it is seen before the
    devices whose readings wait would be taken for silent."""
    return max(1.0, min(5.0, stale_after_s / 4))


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
        stalled = False
        while True:
            swept = await sweep_statuses(
                conn,
                stale_after_s=self._stale_after_s,
                offline_after_s=self._offline_after_s,
                now=self._clock(),
                since=since,
            )
            self.sweeps += 1
            if swept.stalled_at is not None:
                since = swept.stalled_at if since is None else max(since, swept.stalled_at)
            if swept.stalled_at is not None and not stalled:
                log.warning(
                    "device statuses held: a write has waited over %g s for a lock in the "
                    "database, so devices whose readings wait are not taken for silent; "
                    "their silence counts from when writes go through again",
                    default_stall(self._stale_after_s),
                )
            elif stalled and swept.stalled_at is None:
                log.info("device statuses: writes go through again; silence counts from now")
            stalled = swept.stalled_at is not None
            if swept.stale or swept.offline:
                log.info(
                    "device statuses: %d now STALE, %d now OFFLINE, %d NO_HEARTBEAT alerts",
                    swept.stale,
                    swept.offline,
                    swept.alerts_opened,
                )
            await self._round_finished()
            await asyncio.sleep(self.interval_s)

    async def _round_finished(self) -> None:
        self.rounds += 1
        async with self._round_done:
            self._round_done.notify_all()

    async def wait_rounds(self, rounds: int) -> None:
        """Until this sweeper has finished ``rounds`` rounds (lock attempts or sweeps) in all."""
        async with self._round_done:
            await self._round_done.wait_for(lambda: self.rounds >= rounds)
