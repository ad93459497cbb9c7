"""Whether PostgreSQL cleans up after Pulse: autovacuum, which Pulse needs and does not run.

Every write updates its tenant's row (the ids it hands out), a device's row when it is
marked seen, and the rollups' rows in place; each update leaves a dead row version for
autovacuum to reclaim. Without it those tables and their indexes only grow, and every
write reads further: a soak audit on a server with autovacuum off (7 December 2026)
saw, in 32 minutes, 842 dead versions of 5 tenant rows, 144,000 in the rollups and
5,400 in `stream_connections` with no live row left. A server set up that way is said
at startup, in one line, as it says nothing else of it.
"""

from __future__ import annotations

import logging

import asyncpg

from pulse.logs import INSTANCE_WIDE

log = logging.getLogger(__name__)

# The server's settings that stop autovacuum for every table (track_counts: autovacuum
# decides from those counts), and this schema's tables that have it turned off.
VACUUM_OFF = """
SELECT array_remove(ARRAY[
           CASE WHEN NOT current_setting('autovacuum')::bool THEN 'autovacuum = off' END,
           CASE WHEN NOT current_setting('track_counts')::bool THEN 'track_counts = off' END
       ], NULL) AS settings,
       ARRAY(SELECT c.relname::text FROM pg_class c
              WHERE c.relnamespace = current_schema()::regnamespace
                AND c.relkind IN ('r', 'p', 'm')
                AND EXISTS (SELECT 1 FROM unnest(c.reloptions) AS o
                             WHERE o ~* '^autovacuum_enabled=(false|off|no|0)$')
              ORDER BY c.relname) AS tables
"""


async def left_unvacuumed(conn: asyncpg.Connection) -> tuple[list[str], list[str]]:
    """The settings that keep autovacuum from every table, and the tables it may not
    clean (their ``autovacuum_enabled`` off)."""
    row = await conn.fetchrow(VACUUM_OFF)
    assert row is not None
    return list(row["settings"]), list(row["tables"])


def warn_unvacuumed(settings: list[str], tables: list[str], where: str | None) -> None:
    """One warning naming what keeps autovacuum from Pulse's tables, if anything does."""
    if not settings and not tables:
        return
    said = [f"the server has {' and '.join(settings)}"] if settings else []
    if tables:
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        said.append(f"autovacuum_enabled is off for {shown}")
    what = "; ".join(said)
    log.warning(
        "the database%s is not vacuumed automatically (%s): every write leaves dead rows "
        "(its tenant's, its devices', the rollups'), which only autovacuum reclaims; "
        "without it these tables grow and writes slow down. Turn autovacuum on, or "
        "VACUUM them on a schedule (docs/operations.md, Vacuum)",
        f" {where}" if where else "",
        what,
        extra=INSTANCE_WIDE,
    )
