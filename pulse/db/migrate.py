"""Applies the numbered .sql files of migrations/ in order, each once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from importlib import resources

import asyncpg

from pulse.db.errors import CONNECTION_ERRORS
from pulse.db.pool import describe
from pulse.logs import INSTANCE_WIDE

log = logging.getLogger(__name__)

# Any constant shared by every runner: concurrent `pulse migrate` runs queue here.
_LOCK_KEY = 0x70756C7365  # "pulse"
# A migration holds every write while it runs: it locks `tenants` first, as most writes
# do (_lock_as_writers_do). So it waits at most this long for any one lock (in-flight
# writes end in milliseconds): a lock that another query holds longer (an export may
# stream for an hour; a transaction left open) makes it roll back at once, so that
# writes go on, and wait for that query without holding anything (_wait_for_holders).
# Before, it waited 5 s for that query holding `tenants`, five times: writes of every
# tenant stalled for most of 30 s (the operations audit, finding 4).
HOLD_WRITES_S = 1.0
# How long in all a migration waits for the queries holding its tables' locks before
# it gives up (rolled back, nothing changed): writes go on meanwhile.
WAIT_S = 60.0
# How often PostgreSQL checks, while a migration's statement runs, that the runner is
# still there (client_connection_check_interval, PostgreSQL 14 and later, on Linux): a
# `pulse migrate` killed mid-migration no longer leaves its backend running the
# statement, holding `tenants` (every write waits) until the statement's end, for a
# re-run to do it all again (the upgrade audit: 15.5 s more, after a kill -9).
CLIENT_CHECK_S = 1.0
# How often the watching connection looks at what the migration waits for.
_WATCH_EVERY_S = 0.05
_HOLDERS_EVERY_S = 0.1
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(package: str = "pulse.migrations") -> list[Migration]:
    found = []
    for entry in resources.files(package).iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), entry.name, entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a number: {versions}")
    return found


async def pending(conn: asyncpg.Connection) -> list[str]:
    """The migrations this database still lacks (all of them when it never was migrated)."""
    applied = await _applied(conn)
    return [m.name for m in discover() if m.version not in applied]


async def unknown(conn: asyncpg.Connection) -> list[str]:
    """The migrations applied to this database that this code does not have: a newer
    release migrated it (``warn_unknown``)."""
    applied = await _applied(conn)
    known = {m.version for m in discover()}
    return [name for version, name in sorted(applied.items()) if version not in known]


async def _applied(conn: asyncpg.Connection) -> dict[int, str]:
    if await conn.fetchval("SELECT to_regclass('pulse_migrations')") is None:
        return {}
    return {r[0]: r[1] for r in await conn.fetch("SELECT version, name FROM pulse_migrations")}


def warn_unknown(names: list[str], where: str | None) -> None:
    """Say, once, that ``where`` was migrated by a newer release than this code.

    A warning, not a refusal: while a release phase applies new migrations, the old
    release's processes go on serving, and any that restarts then (a crash, a
    worker replaced, a scale-up) starts against the newer database; most migrations
    leave what older code uses in place (releases of three eras ran without an error
    against a database migrated by a later one). Refusing would make those restarts
    fail for the whole deploy, and would refuse the rollback of code that works. What
    does not work is named here, for whoever reads the log of a rollback
    (docs/operations.md, "Rolling back")."""
    if not names:
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    log.warning(
        "the database%s was migrated by a newer release than this one (%s, unknown to "
        "this release): this release may not work with it; roll the release forward "
        "again rather than the code back (docs/operations.md, Rolling back)",
        f" {where}" if where else "",
        shown,
        extra=INSTANCE_WIDE,
    )


async def _lock_as_writers_do(conn: asyncpg.Connection) -> None:
    """Take `tenants` before anything else, as a write that reserves its ids first does
    (on the tenant's row, before it inserts): a migration that locks `telemetry` and
    then `tenants` (0007 renames the one, then references the other) would otherwise
    deadlock with such a write holding `tenants` and waiting for `telemetry`. Writes
    wait for the migration's transaction instead (and for HOLD_WRITES_S at most while
    it waits for a lock); reads do not wait for this lock.

    A write that foresaw its ids (pulse.ingest.ids) inserts before it reserves: it
    holds `telemetry` and waits for `tenants`, so a migration that then wants
    `telemetry` exclusively waits for it, in a cycle. Within about a second either
    PostgreSQL's deadlock check aborts the write (answered 503, nothing stored: the
    client retries) or the migration's lock_timeout rolls it back to try again; no
    order of the migration's locks avoids it, since writes take the two tables in
    both orders."""
    if await conn.fetchval("SELECT to_regclass('tenants') IS NOT NULL"):
        await conn.execute("LOCK TABLE tenants IN SHARE ROW EXCLUSIVE MODE")


async def migrate(
    conn: asyncpg.Connection,
    migrations: list[Migration] | None = None,
    *,
    dsn: str | None = None,
    hold_s: float = HOLD_WRITES_S,
    wait_s: float = WAIT_S,
) -> list[str]:
    """Apply what is missing; return the names applied by this call.

    With ``dsn`` (conn's database), a second connection watches what a migration
    waits for, so that it waits for the very queries that hold its locks, and tries
    again the moment they end; without it, it tries again after a pause.
    """
    migrations = discover() if migrations is None else migrations
    applied_now: list[str] = []
    await _check_client(conn)
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    watch: asyncpg.Connection | None = None
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS pulse_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   checksum   text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch("SELECT version, name, checksum FROM pulse_migrations")
        applied = {row["version"]: row for row in rows}
        known = {m.version for m in migrations}
        warn_unknown(
            [
                r["name"]
                for r in sorted(rows, key=lambda r: r["version"])
                if r["version"] not in known
            ],
            describe(dsn) if dsn else None,
        )
        for migration in migrations:
            done = applied.get(migration.version)
            if done is not None:
                if done["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.name} was edited after it was applied "
                        f"(recorded as {done['name']}); add a new migration instead"
                    )
                continue
            if watch is None and dsn is not None:
                watch = await _open_watch(dsn)
            await _apply(conn, migration, hold_s, wait_s, watch)
            log.info("applied migration %s", migration.name)
            applied_now.append(migration.name)
    except BaseException:
        if watch is not None:
            watch.terminate()
        # What ended the run is raised, never this unlock's failure: on a connection lost
        # (its backend terminated, say) asyncpg has detached the connection, whose every
        # call raises `connection has been released back to the pool`; its session, and
        # the lock, went with it.
        with contextlib.suppress(*CONNECTION_ERRORS):
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
        raise
    if watch is not None:
        watch.terminate()
    await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def _check_client(conn: asyncpg.Connection) -> None:
    """Have the server end this session's statement within CLIENT_CHECK_S of the
    runner's death: where it can (PostgreSQL 14 and later, on a platform with the
    check); elsewhere nothing is changed, and a killed runner's statement runs to its end."""
    if conn.get_server_version().major < 14:
        return
    try:
        await conn.execute(
            f"SET client_connection_check_interval = '{round(CLIENT_CHECK_S * 1000)}ms'"
        )
    except (asyncpg.InvalidParameterValueError, asyncpg.UndefinedObjectError) as exc:
        log.debug("migrations run without client_connection_check_interval: %s", exc)


async def _open_watch(dsn: str) -> asyncpg.Connection | None:
    try:
        return await asyncpg.connect(
            dsn, timeout=10, server_settings={"application_name": "pulse migrate (watching)"}
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("migrations cannot watch their lock waits (%s); they pause instead", exc)
        return None


@dataclasses.dataclass(frozen=True)
class _Holder:
    """A transaction that held a lock the migration waited for."""

    pid: int
    vxid: str  # its virtual transaction id: gone from pg_locks when it ends
    said: str  # for the log: its application, state and age (never its query's text)


# What the migration's backend waits for, when it waits for a lock: the transactions
# ahead of it (pg_blocking_pids), each by its virtual transaction id, which every
# transaction holds a lock on until it ends (pg_locks shows it to every user, where
# pg_stat_activity hides other users' states). The first condition is checked once,
# before pg_blocking_pids, which takes the lock manager's locks, is called.
_HOLDERS = """
    SELECT l.pid, l.virtualxid,
           concat_ws(', ', nullif(a.application_name, ''), a.state,
                     'in a transaction for '
                     || round(extract(epoch FROM now() - a.xact_start))::text || ' s') AS said
      FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
     WHERE EXISTS (SELECT 1 FROM pg_stat_activity w
                    WHERE w.pid = $1 AND w.wait_event_type = 'Lock')
       AND l.locktype = 'virtualxid' AND l.granted AND l.virtualxid = l.virtualtransaction
       AND l.pid IN (SELECT unnest(pg_blocking_pids($1)))"""
_LEFT = "SELECT count(*) FROM pg_locks WHERE locktype = 'virtualxid' AND virtualxid = ANY($1)"


async def _watch(
    watch: asyncpg.Connection, pid: int, holders: dict[str, _Holder], done: asyncio.Event
) -> None:
    """Note who ``pid`` waits for, until ``done`` (never cancelled mid-query: the
    connection goes on serving)."""
    while not done.is_set():
        for row in await watch.fetch(_HOLDERS, pid):
            holders.setdefault(
                row["virtualxid"], _Holder(row["pid"], row["virtualxid"], row["said"])
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), _WATCH_EVERY_S)


async def _wait_for_holders(
    watch: asyncpg.Connection, holders: list[_Holder], wait_s: float
) -> None:
    """Until every transaction of ``holders`` has ended, or ``wait_s`` has passed."""
    deadline = time.monotonic() + wait_s
    vxids = [h.vxid for h in holders]
    while await watch.fetchval(_LEFT, vxids):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(_HOLDERS_EVERY_S, left))


def _named(holders: list[_Holder]) -> str:
    if not holders:
        return "a query"  # not seen (no watching connection)
    return "; ".join(f"pid {h.pid} ({h.said or 'another user'})" for h in holders[:3]) + (
        f" and {len(holders) - 3} more" if len(holders) > 3 else ""
    )


@contextlib.asynccontextmanager
async def _transaction(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """``conn.transaction()``, but a block that ended with the connection lost raises
    what ended it, not the rollback's failure on the lost connection (`the underlying
    connection is closed`, which hid `terminating connection due to administrator
    command`: the upgrade audit)."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        yield
    except BaseException:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await transaction.rollback()
        raise
    await transaction.commit()


async def _apply(
    conn: asyncpg.Connection,
    migration: Migration,
    hold_s: float,
    wait_s: float,
    watch: asyncpg.Connection | None,
) -> None:
    """One migration in one transaction. Every lock it waits for more than ``hold_s``
    (holding writes meanwhile) rolls it back; it waits for the transactions that held
    that lock, holding nothing, then tries again; for ``wait_s`` in all."""
    deadline = time.monotonic() + wait_s
    pid = conn.get_server_pid()
    tries = 0
    while True:
        tries += 1
        holders: dict[str, _Holder] = {}
        done = asyncio.Event()
        watching = asyncio.create_task(_watch(watch, pid, holders, done)) if watch else None
        try:
            async with _transaction(conn):
                await conn.execute(f"SET LOCAL lock_timeout = '{max(1, round(hold_s * 1000))}ms'")
                await _lock_as_writers_do(conn)
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO pulse_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            return
        except asyncpg.LockNotAvailableError:
            pass
        finally:
            done.set()
            if watching is not None:
                try:
                    await watching
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    log.warning("migrations stop watching their lock waits: %s", exc)
                    watch = None
        held_by = list(holders.values())
        left = deadline - time.monotonic()
        if left <= 0:
            raise MigrationError(
                f"migration {migration.name} did not get its tables' locks in {wait_s:g} s "
                f"({tries} tries), held by {_named(held_by)} (see pg_stat_activity); it was "
                "rolled back, run it again when that is done"
            ) from None
        log.warning(
            "migration %s waited %g s for a lock held by %s; rolled back so that writes go "
            "on, it tries again when that transaction ends (for %.0f s more at most)",
            migration.name,
            hold_s,
            _named(held_by),
            left,
        )
        if watch is not None and held_by:
            await _wait_for_holders(watch, held_by, left)
        else:
            await asyncio.sleep(min(tries, 5, left))
