"""The embedded PostgreSQL used when no DATABASE_URL is configured."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

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
