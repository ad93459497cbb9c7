"""Applies the numbered .sql files of migrations/ in order, each once."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
from importlib import resources

import asyncpg

log = logging.getLogger(__name__)

# Any constant shared by every runner: concurrent `pulse migrate` runs queue here.
_LOCK_KEY = 0x70756C7365  # "pulse"
# How long a migration waits for a table's lock, and how many times it tries. A long
# read (an export may stream for an hour) holds its tables; a migration waiting behind
# it would hold every write behind itself (they queue on the locks it holds or waits
# for). So it gives up after a few seconds, writes go on, and it tries again.
LOCK_TIMEOUT_S = 5.0
ATTEMPTS = 5
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
    table = await conn.fetchval("SELECT to_regclass('pulse_migrations')")
    applied = (
        set()
        if table is None
        else {r[0] for r in await conn.fetch("SELECT version FROM pulse_migrations")}
    )
    return [m.name for m in discover() if m.version not in applied]


async def _lock_as_writers_do(conn: asyncpg.Connection) -> None:
    """Take `tenants` before anything else, as every write does (its ids are reserved on
    the tenant's row before it inserts): a migration that locks `telemetry` and then
    `tenants` (0007 renames the one, then references the other) would otherwise
    deadlock with a live write holding `tenants` and waiting for `telemetry`, and one of
    the two would fail. Writes wait for the migration's transaction instead; reads do
    not wait for this lock."""
    if await conn.fetchval("SELECT to_regclass('tenants') IS NOT NULL"):
        await conn.execute("LOCK TABLE tenants IN SHARE ROW EXCLUSIVE MODE")


async def migrate(
    conn: asyncpg.Connection,
    migrations: list[Migration] | None = None,
    *,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
    attempts: int = ATTEMPTS,
) -> list[str]:
    """Apply what is missing; return the names applied by this call."""
    migrations = discover() if migrations is None else migrations
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
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
        for migration in migrations:
            done = applied.get(migration.version)
            if done is not None:
                if done["checksum"] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.name} was edited after it was applied "
                        f"(recorded as {done['name']}); add a new migration instead"
                    )
                continue
            await _apply(conn, migration, lock_timeout_s, attempts)
            log.info("applied migration %s", migration.name)
            applied_now.append(migration.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now


async def _apply(
    conn: asyncpg.Connection, migration: Migration, lock_timeout_s: float, attempts: int
) -> None:
    """One migration in one transaction; rolled back and tried again, after a pause, when
    a lock it needs is not had within ``lock_timeout_s``."""
    for attempt in range(1, attempts + 1):
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{round(lock_timeout_s * 1000)}ms'")
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
            if attempt == attempts:
                raise MigrationError(
                    f"migration {migration.name} did not get its tables' locks in {attempts} "
                    f"tries of {lock_timeout_s:g} s: a long query or export holds one (see "
                    "pg_stat_activity); it was rolled back, run it again"
                ) from None
            log.warning(
                "migration %s waited %g s for a lock a query holds; writes went on; "
                "trying again (%d of %d)",
                migration.name,
                lock_timeout_s,
                attempt + 1,
                attempts,
            )
            await asyncio.sleep(min(attempt, 5))
