"""Retention: telemetry lives in one partition per UTC day of receipt (migration 0007);
days are created ahead and dropped whole once past the window. Closed alerts are
deleted once closed for longer than theirs (``delete_closed_alerts``).

Dropping a day costs the same whatever it holds, where deleting its rows cost a
delete per reading and the vacuum after. A partition is detached CONCURRENTLY
(a SHARE UPDATE EXCLUSIVE lock: ingest and readers never wait for it; the detach
waits for the queries that use the table) and then dropped on its own. One
process of the cluster works at a time, under a session advisory lock.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Coroutine
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from pulse.db.database import Database, partition_missing
from pulse.db.errors import DatabaseUnavailable
from pulse.db.queries import load_queries
from pulse.logs import Throttled
from pulse.times import window_start

log = logging.getLogger(__name__)
Q = load_queries(__package__)
# A step failing for a reason that lasts (a permission revoked): its traceback once,
# then a line per 10 minutes with how many passes failed so.
_failed = Throttled(log, every_s=600.0)
_not_droppable = Throttled(log, every_s=600.0)

RETENTION_LOCK_KEY = 0x70756C73_65_7274  # "pulse" "rt"
# Partitions exist this many days ahead of today, so that ingest never meets a
# missing day even when no process of the cluster ran for a while.
DAYS_AHEAD = 3
# DDL waits at most this long for a lock, then tries again at the next pass
# rather than holding a queue of other sessions behind it.
LOCK_TIMEOUT = "5s"


def utc_today() -> date:
    return datetime.now(UTC).date()


async def create_partitions(db: Database, first_day: date, last_day: date) -> int:
    """Create the missing daily partitions in [first_day, last_day]; return how many."""
    async with db.transaction() as conn:
        await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        created: int = await conn.fetchval(Q["create_telemetry_partitions"], first_day, last_day)
    return created


def quoted(identifier: str) -> str:
    """A role's or table's name as a statement to paste takes it: bare when plain,
    else double-quoted ("GRANT CREATE ... TO Ops" names the role ops)."""
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", identifier):
        return identifier
    return '"' + identifier.replace('"', '""') + '"'


class PartitionsNotManageable(Exception):
    """The serving role may not make or drop telemetry's daily partitions."""


async def check_partitions_manageable(db: Database) -> None:
    """Raise PartitionsNotManageable unless this role may make and drop the days.

    A role granted only SELECT, INSERT, UPDATE and DELETE on the tables (as
    docs/operations.md once advised) served while the days made by the owner's last
    run lasted: no day was made past them nor dropped, and three days later every
    reading was refused with 503 while /readyz said ready (a review, 8 December)."""
    row = await db.fetchrow(Q["partitions_not_manageable"])
    if row is None:
        return
    role, owner = quoted(await db.fetchval("SELECT current_user")), quoted(row["owner"])
    schema = row["schema"]  # regnamespace's text: quoted already where it must be
    if row["member"]:  # the owner, or a member: CREATE on the schema is what is missing
        raise PartitionsNotManageable(
            f"role {role} may not create tables in schema {schema}, where telemetry's "
            f"daily partitions are made: GRANT CREATE ON SCHEMA {schema} TO {owner}"
        )
    raise PartitionsNotManageable(
        f"role {role} may not make or drop telemetry's daily partitions, which PostgreSQL "
        f"lets only its owner ({owner}) and the owner's members do: serve as {owner}, the "
        f"role that ran `pulse migrate`, or GRANT {owner} TO {role}; grants on the tables "
        "are not enough"
    )


async def ensure_partitions(db: Database, *, days_ahead: int = DAYS_AHEAD) -> int:
    """Today and the next ``days_ahead`` days have a partition."""
    today = utc_today()
    return await create_partitions(db, today, today + timedelta(days=days_ahead))


async def drop_expired(db: Database, cutoff: datetime) -> list[str]:
    """Drop the partitions holding only rows received before ``cutoff``; return their names.

    Returns [] at once when another process holds this turn.
    """
    dropped: list[str] = []
    async with db.connection() as conn:
        if not await conn.fetchval(Q["try_retention_lock"], RETENTION_LOCK_KEY):
            return dropped
        try:
            await conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
            kept: list[str] = []  # expired, but owned by a role this one may not act as
            for row in await conn.fetch(Q["expired_telemetry_partitions"], cutoff):
                name = row["name"]
                if not row["droppable"]:
                    # Detached, it could not be dropped, and was never listed again: its
                    # rows kept for ever (a day made by another role, before 0021).
                    kept.append(f"{name} ({row['owner']})")
                    continue
                # DETACH CONCURRENTLY cannot run in a transaction; one that was
                # interrupted left the partition "detach pending": FINALIZE ends it.
                how = "FINALIZE" if row["detach_pending"] else "CONCURRENTLY"
                await conn.execute(f'ALTER TABLE telemetry DETACH PARTITION "{name}" {how}')
                await conn.execute(f'DROP TABLE "{name}"')
                dropped.append(name)
            for row in await conn.fetch(Q["expired_detached_days"], cutoff):
                if row["droppable"]:
                    await conn.execute(f'DROP TABLE "{row["name"]}"')
                    dropped.append(row["name"])
                else:
                    kept.append(f"{row['name']} ({row['owner']}, out of telemetry)")
            if kept:
                owner = quoted(await conn.fetchval(Q["telemetry_owner"]))
                _not_droppable.warning(
                    "retention: kept %d expired day(s) owned by roles this one is not a "
                    "member of: %s; drop each as its owner, or give it to telemetry's owner "
                    "(ALTER TABLE <day> OWNER TO %s) for the next pass to drop",
                    len(kept),
                    ", ".join(kept),
                    owner,
                )
        finally:
            await conn.execute("RESET lock_timeout")
            await conn.fetchval(Q["retention_unlock"], RETENTION_LOCK_KEY)
    return dropped


async def delete_closed_alerts(db: Database, cutoff: datetime, *, batch: int = 5000) -> int:
    """Delete the alerts closed before ``cutoff``, ``batch`` at a time (each its own
    short transaction); return how many. 0 at once when another process holds this turn."""
    deleted = 0
    async with db.connection() as conn:
        if not await conn.fetchval(Q["try_retention_lock"], RETENTION_LOCK_KEY):
            return deleted
        try:
            while True:
                status = await conn.execute(Q["delete_closed_alerts"], cutoff, batch)
                count = int(status.split()[-1])
                deleted += count
                if count < batch:
                    return deleted
        finally:
            await conn.fetchval(Q["retention_unlock"], RETENTION_LOCK_KEY)


async def run_retention(
    db: Database, retention_hours: float, interval_s: float, *, alert_retention_days: float = 0
) -> None:
    """Every ``interval_s``: days ahead created, days past the window dropped, alerts
    closed for longer than ``alert_retention_days`` (0: kept for ever) deleted; database
    outages and lock timeouts are waited out until the next pass.

    Each step fails on its own: the days ahead are made first, whatever the others do
    (a failing drop once left ingest with no partition for its day, answering 503)."""
    while True:
        await _retention_step("creating partitions ahead", _create_ahead(db))
        now = datetime.now(UTC)
        cutoff = window_start(now, hours=retention_hours)
        if cutoff is not None:
            await _retention_step("dropping expired partitions", _drop(db, cutoff))
        closed_before = window_start(now, days=alert_retention_days)
        if alert_retention_days > 0 and closed_before is not None:
            await _retention_step(
                "deleting closed alerts", _delete_alerts(db, closed_before, alert_retention_days)
            )
        # The next pass after the interval, or within a second of a write that found
        # no partition for its rows.
        deadline = time.monotonic() + interval_s
        # A flag, not an asyncio.Event: translated() sets it from any loop (tests run many).
        while (left := deadline - time.monotonic()) > 0 and not partition_missing():  # noqa: ASYNC110
            await asyncio.sleep(min(1.0, left))


async def _create_ahead(db: Database) -> None:
    created = await ensure_partitions(db)
    if created:
        log.info("retention: created %d telemetry partitions ahead", created)


async def _drop(db: Database, cutoff: datetime) -> None:
    dropped = await drop_expired(db, cutoff)
    if dropped:
        log.info("retention: dropped telemetry partitions %s", ", ".join(dropped))


async def _delete_alerts(db: Database, cutoff: datetime, days: float) -> None:
    gone = await delete_closed_alerts(db, cutoff)
    if gone:
        log.info("retention: deleted %d alerts closed more than %g days ago", gone, days)


async def _retention_step(what: str, step: Coroutine[Any, Any, None]) -> None:
    """One step of a pass; whatever it raises is logged and the pass goes on."""
    try:
        await step
    except DatabaseUnavailable as exc:
        log.warning("retention pass failed (%s): %s", what, exc)
    except asyncpg.LockNotAvailableError as exc:
        log.warning("retention pass put off (%s): %s", what, exc)
    except Exception:
        _failed.error("retention pass failed (%s); trying again at the next pass", what)
