"""The embedded PostgreSQL used when no DATABASE_URL is configured."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import subprocess
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from pulse.db.errors import DatabaseUnavailable
from pulse.db.migrate import migrate
from pulse.db.pool import connect

log = logging.getLogger(__name__)


@contextlib.contextmanager
def embedded_postgres(data_dir: Path) -> Iterator[str]:
    """Start (or reuse) a PostgreSQL server whose data lives in ``data_dir/pgdata``.

    Yields its connection URL and stops the server when the last user in this
    machine lets go of it.
    """
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        _chatter_to(data_dir / "pgserver.log")
    except OSError as exc:
        # One line naming the setting, not a traceback (a file there, no permission).
        where = f" ({exc.filename})" if exc.filename and exc.filename != str(data_dir) else ""
        raise DatabaseUnavailable(
            f"in PULSE_DATA_DIR={data_dir}: {exc.strerror or exc}{where}"
        ) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

        _forget_gone_users(data_dir / "pgdata")
        try:
            _system_user_made_once()
            server = get_server(data_dir / "pgdata", cleanup_mode="stop")
        except (subprocess.CalledProcessError, OSError) as exc:
            # initdb or pg_ctl failed (a file where the data folder goes, a folder of
            # something else, a full disk): one line naming the setting and where the
            # reason is, not a traceback.
            if isinstance(exc, subprocess.CalledProcessError):
                failed = f"{Path(str(exc.cmd[0])).name} failed (status {exc.returncode})"
            else:
                failed = f"PostgreSQL could not start ({exc.strerror or exc})"
            raise DatabaseUnavailable(
                f"in PULSE_DATA_DIR={data_dir}: {failed}; "
                f"its output is in {data_dir / 'pgserver.log'}"
            ) from exc
    log.info(
        "embedded PostgreSQL running with data in %s (log: %s)",
        data_dir / "pgdata",
        data_dir / "pgserver.log",
    )
    try:
        yield str(server.get_uri())
    finally:
        _forget_gone_users(data_dir / "pgdata")
        server.cleanup()


def _system_user_made_once() -> None:
    """As root, pgserver runs PostgreSQL as a system user `pgserver` that it creates with
    `useradd` on first use. Two processes starting at once on a fresh machine (the test
    suite's two workers, two instances) both ran `useradd`: both succeeded, one of them
    with a uid the other's overwrote, and that one's initdb could not use the folder it
    had given to that uid ("could not change permissions ... Operation not permitted").
    So the user is made under a lock every process on the machine shares whatever its
    TMPDIR: /etc/passwd itself, held with flock (useradd replaces the file by a rename,
    so a process that opens it after the rename already sees the user)."""
    if os.name != "posix" or os.geteuid() != 0:
        return
    from pgserver.utils import ensure_user_exists

    with open("/etc/passwd", "rb") as passwd:
        fcntl.flock(passwd, fcntl.LOCK_EX)
        try:
            ensure_user_exists("pgserver")
        finally:
            fcntl.flock(passwd, fcntl.LOCK_UN)


def _forget_gone_users(pgdata: Path) -> None:
    """pgserver stops the server when the last process using it lets go, and counts its
    users in ``.handle_pids.json``: a user killed outright (SIGKILL, out of memory) never
    took itself off, and the server then ran on after every other user had stopped.
    The processes that no longer exist are taken off, under pgserver's own lock."""
    from pgserver.postgres_server import PostgresServer

    users = pgdata / ".handle_pids.json"
    with PostgresServer._lock:
        try:
            pids = json.loads(users.read_text())
        except (OSError, ValueError):
            return  # none yet, or not pgserver's list as this code knows it
        if not isinstance(pids, list):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _exists(pid)]
        if alive != pids:
            users.write_text(json.dumps(alive))


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _chatter_to(path: Path) -> None:
    """pgserver logs every command it runs and its whole output (initdb's is 40 lines) at
    INFO, up to its exit handler: into a file of the data directory, not the console."""
    chatter = logging.getLogger("pgserver")
    for old in list(chatter.handlers):
        chatter.removeHandler(old)
        old.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    chatter.addHandler(handler)
    chatter.propagate = False


@contextlib.asynccontextmanager
async def embedded_database(data_dir: Path) -> AsyncIterator[str]:
    """``embedded_postgres`` from async code (it blocks while the server starts), migrated."""
    loop = asyncio.get_running_loop()
    server = embedded_postgres(data_dir)
    dsn = await loop.run_in_executor(None, server.__enter__)
    try:
        conn = await connect(dsn)
        try:
            await migrate(conn, dsn=dsn)  # each migration applied is logged
        finally:
            await conn.close()
        yield dsn
    finally:
        await loop.run_in_executor(None, server.__exit__, None, None, None)
