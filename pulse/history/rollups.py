"""Rollups per device, metric and minute, and per 15 minutes and hour from the minutes.

One process of the cluster keeps them (a session advisory lock on a connection
of its own, as the relay does); the others stand by, holding no connection
(pulse.db.leadership). Each pass counts, per
tenant, the committed rows after the tenant's watermark, and moves the
watermark in the same transaction: a pass cut short by a crash counts nothing,
the next one counts those rows again from the same place, so each row is
counted exactly once. Rows are taken by id, not by time: ids follow commit
order, so a row that commits late is never skipped, and a reading whose device
time falls in a minute counted already is merged into it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from datetime import UTC, datetime

import asyncpg

from pulse.config import Settings
from pulse.db.database import Database, pause
from pulse.db.errors import DatabaseUnavailable
from pulse.db.leadership import lock_is_free
from pulse.db.queries import load_queries
from pulse.logs import Throttled
from pulse.times import EARLIEST, window_start

log = logging.getLogger(__name__)
Q = load_queries(__package__)

ROLLUP_LOCK_KEY = 0x70756C73_65_7275  # "pulse" "ru"
LEADER_NAME = "pulse rollups"
# Rows of one tenant counted per transaction: a backlog (a fresh migration of a
# large table, a long outage) is worked off in steps that commit as they go. A step
# upserts each of its (device, metric, bucket)s once however many rows it counts;
# 200,000 (0.5x of PostgreSQL's time per row for 2,000 devices in one minute, on
# the machine's PostgreSQL 15) gained nothing measurable under live ingest, whose
# passes are mostly one step, and slowed the backfill of a week of readings, whose
# steps then group far more minutes than work_mem holds.
BATCH_IDS = 50_000
# A step's ids are fewer when its rows are costly: each tenant's steps are sized to
# take about STEP_S, starting from FIRST_STEP_IDS, so that one tenant's backlog holds
# the others' rollups back by a step at a time, not by all of it. What a row costs
# varies by 200x: a reading of 200 metric names never seen before writes 600 new
# rollup rows, and 250 such readings took one step 11 s on the loaded 2-core machine
# (the hostile audit, M2: 5000 of them, one step of 1 M metric values, held every
# other tenant's rollups for about 60 s), where 10,000 readings of 5 known metrics
# take well under a second.
STEP_S = 0.5
FIRST_STEP_IDS = 100
# A pass writes each (device, metric)'s buckets once however many of its readings
# it counts: about six rows per device and metric, while its readings grow with
# the time since the last pass. So the next pass waits at least DUTY times as long
# as the last one took: the rollups take at most a fifth of their connection's time,
# and a fleet of many devices under heavy ingest gets fewer, larger passes. The
# history reads count the rows after the watermark themselves, so a longer wait
# changes no answer. After a long pass (a backlog: a migration, an outage) the wait
# is MAX_PAUSE_S at most.
DUTY = 4.0
MAX_PAUSE_S = 5.0
TRIM_BATCH = 5000
# How long a tenant whose rows could not be counted is left out of the passes.
FAILED_RETRY_S = 60.0
QUERY_TIMEOUT_S = 300.0


@dataclasses.dataclass(frozen=True)
class RollupSettings:
    interval_s: float = 0.5
    minutes_days: float = 30.0
    quarters_days: float = 90.0
    hours_days: float = 730.0
    trim_interval_s: float = 3600.0

    @classmethod
    def of(cls, settings: Settings) -> RollupSettings:
        return cls(
            interval_s=settings.rollup_interval_s,
            minutes_days=settings.rollup_minutes_days,
            quarters_days=settings.rollup_quarters_days,
            hours_days=settings.rollup_hours_days,
        )

    def kept_since(self, now: datetime) -> dict[int, datetime]:
        """Per width (in minutes), the oldest time its rollups are kept from (the
        earliest time there is for a window meant as "for ever")."""
        days = {1: self.minutes_days, 15: self.quarters_days, 60: self.hours_days}
        return {width: window_start(now, days=d) or EARLIEST for width, d in days.items()}


def pause_after(took_s: float, interval_s: float) -> float:
    """How long to wait after a pass that took ``took_s``: the interval, or DUTY times
    the pass when that is longer, up to MAX_PAUSE_S."""
    return max(interval_s, min(DUTY * took_s, MAX_PAUSE_S))


async def roll_up_tenant(conn: asyncpg.Connection, tenant_id: str, newest: int) -> int:
    """Count the tenant's rows after its watermark, up to ``newest`` (committed) at most
    BATCH_IDS of them; return the new watermark."""
    async with conn.transaction():
        counted: int = await conn.fetchval(Q["lock_watermark"], tenant_id)
        upto = min(newest, counted + BATCH_IDS)
        if upto <= counted:
            return counted
        await conn.execute(Q["roll_up"], tenant_id, counted, upto, timeout=QUERY_TIMEOUT_S)
        await conn.execute(Q["move_watermark"], tenant_id, upto)
    return upto


def next_step(size: int, counted: int, took_s: float) -> int:
    """A tenant's next step, in ids, after one of ``size`` ids that counted ``counted``
    of them in ``took_s``: cut to take about STEP_S, doubled (up to BATCH_IDS) after a
    full step that took under half of it."""
    if took_s > STEP_S:
        return max(1, int(counted * STEP_S / took_s))
    if counted >= size and took_s < STEP_S / 2:
        return min(2 * size, BATCH_IDS)
    return min(size, BATCH_IDS)


async def roll_up_once(
    conn: asyncpg.Connection,
    failing: dict[str, float] | None = None,
    steps: dict[str, int] | None = None,
) -> int:
    """Count every tenant's rows up to its newest committed id; return how many ids
    were counted.

    In rounds: a step of each tenant behind, in turn, each sized by ``steps`` (the
    tenant's next step in ids, kept from pass to pass; next_step), and the tenants
    behind read again before each round, until each tenant that was behind in one of
    them has counted up to its newest id of the round it joined in. So a tenant's
    backlog (a bulk load, a long outage, readings of many new metric names) holds back
    every other tenant's rollups by one of its steps, about STEP_S, and not until it is
    all counted; and a pass with no backlog is one round, as before. The pass ends on
    those ids, not on the newest ones: a tenant writing faster than its steps count
    would otherwise keep it in its rounds for ever, and the keeper would never trim nor
    pause. Each tenant joins once and its target stays put, so a pass lasts as long as
    the backlogs it found, as the passes before the rounds did.

    A tenant whose rows PostgreSQL cannot count (a data error: a row that no
    release of Pulse writes, put in by hand, say) is logged and left out until the
    time ``failing`` gives it (monotonic), FAILED_RETRY_S on: one tenant's rows
    never hold back the others' rollups.
    """
    failing = {} if failing is None else failing
    steps = {} if steps is None else steps
    total = 0
    targets: dict[str, int] = {}  # each tenant's newest id in the round it joined in
    more = True
    while more:
        more = False
        now = time.monotonic()
        for row in await conn.fetch(Q["tenants_behind"]):
            tenant_id, counted, newest = row["tenant_id"], row["counted"], row["newest"]
            if failing.get(tenant_id, now) > now:
                continue
            target = targets.setdefault(tenant_id, newest)
            size = min(steps.get(tenant_id, FIRST_STEP_IDS), BATCH_IDS)
            started = time.monotonic()
            try:
                upto = await roll_up_tenant(conn, tenant_id, min(newest, counted + size))
            except asyncpg.DataError:
                failing[tenant_id] = now + FAILED_RETRY_S
                log.exception(
                    "rollups: the rows of tenant %r after id %d cannot be counted; "
                    "the other tenants go on, and this one is tried again in %.0f s",
                    tenant_id,
                    counted,
                    FAILED_RETRY_S,
                )
                continue
            failing.pop(tenant_id, None)
            total += max(0, upto - counted)
            steps[tenant_id] = next_step(size, upto - counted, time.monotonic() - started)
            more = more or counted < upto < target
    return total


async def trim(conn: asyncpg.Connection, settings: RollupSettings) -> int:
    """Delete the rollups past their widths' windows, batch by batch."""
    deleted = 0
    for width, cutoff in settings.kept_since(datetime.now(UTC)).items():
        while True:
            done = await conn.execute(Q["trim_rollups"], width, cutoff, TRIM_BATCH)
            count = int(done.split()[-1])
            deleted += count
            if count < TRIM_BATCH:
                break
    return deleted


class Rollups:
    """The supervised side task: stand by, keep the rollups when the lock is ours."""

    def __init__(self, db: Database, settings: RollupSettings, *, retry_s: float = 1.0) -> None:
        self._db = db
        self._settings = settings
        self._unavailable = Throttled(log)  # a line per 10 s of an outage
        self._retry_s = retry_s
        self.leading = False
        self.asks = 0  # times this process asked whether the lock was free

    async def run(self) -> None:
        while True:
            try:
                # Polled: PostgreSQL does not say when an advisory lock is free.
                self.asks += 1
                if await lock_is_free(self._db, ROLLUP_LOCK_KEY):
                    async with self._db.dedicated(LEADER_NAME) as conn:
                        await self._lead(conn)
            except DatabaseUnavailable as exc:
                self._unavailable.warning(
                    "rollups: the database is unavailable (%s); retrying", exc
                )
            finally:
                self.leading = False
            await asyncio.sleep(self._retry_s)

    async def _lead(self, conn: asyncpg.Connection) -> None:
        if not await conn.fetchval(Q["try_lead_rollups"], ROLLUP_LOCK_KEY):
            return  # another process took it first: stand by again
        self.leading = True
        log.info("this process now keeps the rollups")
        trimmed_at = float("-inf")  # the first pass trims, whatever the uptime
        failing: dict[str, float] = {}  # tenants left out of the passes, until when
        steps: dict[str, int] = {}  # each tenant's next step, in ids
        while True:
            started = time.monotonic()
            await roll_up_once(conn, failing, steps)
            took = time.monotonic() - started
            if time.monotonic() - trimmed_at >= self._settings.trim_interval_s:
                await trim(conn, self._settings)
                trimmed_at = time.monotonic()
            await pause(conn, pause_after(took, self._settings.interval_s))
