"""The embedded PostgreSQL used when no DATABASE_URL is configured."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from pulse.db.migrate import migrate
from pulse.db.pool import connect

log = logging.getLogger(__name__)


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Start (or reuse) a PostgreSQL server whose data lives in ``data_dir/pgdata``.

    Yields its connection URL and stops the server when the last user in this
    machine lets go of it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

        data_dir.mkdir(parents=True, exist_ok=True)
        server = get_server(data_dir / "pgdata", cleanup_mode="stop")
    log.info("embedded PostgreSQL running with data in %s", data_dir / "pgdata")
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


@contextlib.asynccontextmanager
async def embedded_database(data_dir: Path) -> AsyncIterator[str]:
    """``embedded_postgres`` from async code (it blocks while the server starts), migrated."""
    loop = asyncio.get_running_loop()
    server = embedded_postgres(data_dir)
    dsn = await loop.run_in_executor(None, server.__enter__)
    try:
        conn = await connect(dsn)
        try:
            applied = await migrate(conn)
        finally:
            await conn.close()
        if applied:
            log.info("embedded database migrated: %s", ", ".join(applied))
        yield dsn
    finally:
        await loop.run_in_executor(None, server.__exit__, None, None, None)
