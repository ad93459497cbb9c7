"""Database: the one object over the pool, where driver errors are translated, once.

Every query of Pulse runs through it: the named SQL blocks of each package's
``queries.sql`` (``pulse.db.queries``), on a pooled connection, in a
transaction, or on a dedicated connection of its own (LISTEN and session
advisory locks, which a pool would reset). A connection lost, a server gone or
a query timed out, cancelled or aborted for a reason that passes (a deadlock, a
serialization failure) is raised as ``DatabaseUnavailable`` and nothing else; SQL
errors (a constraint, a bad query) pass through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from pulse.db.errors import (
    CONNECTION_ERRORS,
    TRANSIENT_ERRORS,
    DatabaseTimeout,
    DatabaseUnavailable,
    cancelled_by_statement_timeout,
    statement_timed_out,
)
from pulse.db.pool import (
    CONNECT_TIMEOUT_S,
    KEEPALIVES,
    ConnectTimeout,
    connect,
    create_pool,
    describe,
)

_UNAVAILABLE: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    *TRANSIENT_ERRORS,
    TimeoutError,
)

# A dedicated connection holds session locks (the lead of the sweeper, the rollups,
# the relay): if its process's machine vanishes without closing it, PostgreSQL must
# notice in seconds (pulse.db.pool.KEEPALIVES), so that another process can take the
# lead. A process whose machine is up but which is itself stopped or hung (SIGSTOP, an
# event loop that never yields) keeps its connections open and answers the TCP
# probes: PostgreSQL ends a dedicated connection that has sent nothing for this long
# (``idle_session_timeout``, PostgreSQL 14 and later), and with it the lead it held.
# Every holder sends a statement at least every 5 s (the sweeper each sweep, the
# rollups each pass or ``pause``, the relay and the listener a health check).
DEDICATED_SILENCE_S = 15
POOL_CLOSE_S = 2.0
# Less time than this left for a statement once its connection came is none at all.
MIN_STATEMENT_S = 0.01
ALIVE_EVERY_S = 5.0
DEDICATED_KEEPALIVES = KEEPALIVES


# Whether a write found no partition for its rows since the retention loop last
# looked (pulse.db.retention makes the missing days at once, not at its next pass).
_partition_missing = False


def partition_missing() -> bool:
    """Whether a write found no partition for its rows since the last call."""
    global _partition_missing
    missing, _partition_missing = _partition_missing, False
    return missing


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Driver errors that mean "unreachable" raised as DatabaseUnavailable: the one translation.

    A statement's timeout is raised as DatabaseTimeout (a DatabaseUnavailable), so that
    it is said as a timeout, not as an outage; as a timeout of a database that is up
    only when the server cancelled it (its statement_timeout), since asyncpg's own
    timeout fires alike when the server stopped answering.

    Database's methods apply it; code holding a dedicated connection applies it
    to calls made outside the ``dedicated`` block's own task.
    """
    try:
        yield
    except asyncpg.LockNotAvailableError:
        raise  # a lock_timeout the caller set: the caller handles it (retention, partitions)
    except _UNAVAILABLE as exc:
        if statement_timed_out(exc):
            raise DatabaseTimeout(
                _one_line(str(exc)) or "no answer within the statement's timeout",
                database_up=cancelled_by_statement_timeout(exc),
            ) from exc
        raise DatabaseUnavailable(_one_line(str(exc)) or type(exc).__name__) from exc
    except asyncpg.CheckViolationError as exc:
        if not str(exc).startswith("no partition of relation"):
            raise
        # Today's partition is missing (dropped by hand, or a clock far off): the
        # next retention pass makes it (PULSE_RETENTION_INTERVAL_S); meanwhile the
        # write is refused as unavailable, to be retried, not as a server error.
        global _partition_missing
        _partition_missing = True
        raise DatabaseUnavailable(f"{_one_line(str(exc))}; it is being made again") from exc


def _one_line(text: str) -> str:
    """The driver's words on one line: asyncpg puts the server's DETAIL and HINT after
    a newline, and this text goes into log lines (a missing partition's warning was
    two lines, its second with no time or level) and error bodies."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@contextlib.asynccontextmanager
async def _released(pool: asyncpg.Pool, conn: asyncpg.Connection) -> AsyncIterator[Any]:
    """``conn``, acquired from ``pool``, given back to it when the block ends."""
    try:
        yield conn
    finally:
        await pool.release(conn)


class Database:
    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn
        self._releasing: set[asyncio.Task[None]] = set()  # see _statement

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, dsn: str, *, pool_size: int = 10, connect_timeout: float = CONNECT_TIMEOUT_S
    ) -> AsyncIterator[Database]:
        """A pool of up to ``pool_size`` connections, closed when the block ends.

        Any failure to connect (refused, no such database, wrong password) raises
        DatabaseUnavailable, saying which database without its credentials. Each
        connection is made within ``connect_timeout`` (PULSE_DB_CONNECT_TIMEOUT_S) and
        set up within as long again (``pulse.db.pool.create_pool``).
        """
        try:
            # A backstop: create_pool bounds the connect and the set-up itself.
            async with asyncio.timeout(2 * connect_timeout + 1):
                pool = await create_pool(dsn, max_size=pool_size, connect_timeout=connect_timeout)
        except TimeoutError as exc:
            if isinstance(exc, ConnectTimeout) and exc.answered:
                reason = (
                    "the server answered but the connection's set-up took over "
                    f"{connect_timeout:g} s"
                )
            else:
                reason = await _silence(dsn, connect_timeout)
            raise DatabaseUnavailable(f"{describe(dsn)}: {reason}") from exc
        except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(f"{describe(dsn)}: {str(exc) or type(exc).__name__}") from exc
        try:
            yield cls(pool, dsn)
        finally:
            # Bounded: a connection still busy (a statement waiting on a lock) would
            # hold the process past its shutdown timeout. (Nothing to do when the
            # runtime's stop closed it already: pulse.runtime._stop.)
            try:
                await asyncio.wait_for(pool.close(), POOL_CLOSE_S)
            except TimeoutError:
                pool.terminate()

    async def close(self) -> None:
        """Close the pool: wait for its connections to be released, for at most
        POOL_CLOSE_S, then close the busy ones unanswered."""
        try:
            await asyncio.wait_for(self.pool.close(), POOL_CLOSE_S)
        except TimeoutError:
            self.pool.terminate()

    def terminate(self) -> None:
        """Close the pool's connections now, unanswered: every statement still waiting on
        one ends (a database that stopped answering, at the shutdown's end)."""
        self.pool.terminate()

    async def fetch(self, query: str, *args: Any, timeout: float | None = None) -> list[Any]:
        return await self._statement("fetch", query, args, timeout)  # type: ignore[no-any-return]

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._statement("fetchrow", query, args, timeout)

    async def fetchval(self, query: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._statement("fetchval", query, args, timeout)

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        return await self._statement("execute", query, args, timeout)  # type: ignore[no-any-return]

    async def _statement(
        self, method: str, query: str, args: tuple[Any, ...], timeout: float | None
    ) -> Any:
        """One statement, by the connection's ``method``, on a pooled connection; its
        ``timeout`` is the caller's whole wait: for the connection, then the statement.

        A statement that timed out (or whose caller was cancelled) is cancelled by
        asyncpg over a connection of its own, and the pool takes the connection back only
        once the server has answered that: a server that stopped answering (SIGSTOPped,
        its machine gone) held the caller of a 0.5 s statement for command_timeout, 60 s.
        The connection goes back to the pool in the background instead. (The next
        caller may find the pool's connections all held so: the timeout bounds its wait
        for one too.)"""
        with translated():
            if timeout is None:
                conn, left = await self.pool.acquire(), None
            else:
                conn, left = await self._acquire_within(timeout)
            try:
                result = await getattr(conn, method)(query, *args, timeout=left)
            except (TimeoutError, asyncio.CancelledError):
                released = asyncio.get_running_loop().create_task(self._release(conn))
                self._releasing.add(released)
                released.add_done_callback(self._releasing.discard)
                raise
            except BaseException:
                await self.pool.release(conn)
                raise
            await self.pool.release(conn)
            return result

    async def _acquire_within(self, timeout: float) -> tuple[asyncpg.Connection, float]:
        """A pooled connection within ``timeout``, and the time left for a statement.
        asyncpg keeps that timeout as the connection's release budget: a statement given
        up on whose cancel is not answered within it has its connection closed, not
        given back."""
        started = time.monotonic()
        try:
            conn = await self.pool.acquire(timeout=timeout)
        except TimeoutError:
            conn = None
        left = timeout - (time.monotonic() - started)
        if conn is not None and left < MIN_STATEMENT_S:  # it could not finish
            await self.pool.release(conn)
            conn = None
        if conn is None:
            raise DatabaseUnavailable(
                f"no database connection within {timeout:g} s (none came free, or a new "
                "one was not made in time)"
            )
        return conn, left

    @property
    def releasing(self) -> bool:
        """Whether a statement given up on (_statement) is still being cancelled: the
        database has not answered that cancel yet."""
        return bool(self._releasing)

    async def _release(self, conn: asyncpg.Connection) -> None:
        with contextlib.suppress(Exception):  # the pool, closed meanwhile, closed it
            await self.pool.release(conn)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for several statements; errors in the block are translated."""
        with translated():
            async with self.pool.acquire() as conn:
                yield conn

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection in a transaction, committed when the block ends without error."""
        with translated():
            async with self.pool.acquire() as conn, conn.transaction():
                yield conn

    @contextlib.asynccontextmanager
    async def transaction_ending_itself(
        self, *, acquire_timeout: float | None = None
    ) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection in a transaction the block may end itself, with a string
        of statements that ends in COMMIT (one round trip for the last statement and
        the commit): committed when the block ends with it still open, rolled back
        when the block raises. Inside it, a savepoint is a ``SAVEPOINT`` statement
        (asyncpg's ``Connection.transaction`` refuses a transaction it did not begin).
        ``acquire_timeout``: DatabaseUnavailable, nothing begun, if no pooled connection
        comes free within that many seconds.
        """
        with translated():
            try:
                acquired = await self.pool.acquire(timeout=acquire_timeout)
            except TimeoutError:
                raise DatabaseUnavailable(
                    f"no database connection came free within {acquire_timeout:g} s (each "
                    "held by a statement the database has not answered); nothing was written"
                ) from None
            async with _released(self.pool, acquired) as conn:
                await conn.execute("BEGIN")
                try:
                    yield conn
                except BaseException:
                    # A lost connection is already gone from the block (asyncpg detaches
                    # its proxy, whose every call then raises): what ended the block is
                    # raised, never a failure of this rollback.
                    with contextlib.suppress(*CONNECTION_ERRORS):
                        if conn.is_in_transaction():
                            await conn.execute("ROLLBACK")
                    raise
                if conn.is_in_transaction():
                    await conn.execute("COMMIT")

    @contextlib.asynccontextmanager
    async def dedicated(
        self, application_name: str, *, timeout: float = 10.0
    ) -> AsyncIterator[asyncpg.Connection]:
        """A connection of its own, outside the pool, named in pg_stat_activity; closed
        (abruptly: that also releases its session locks) when the block ends, and
        dropped by the server within seconds when its peer vanishes
        (``DEDICATED_KEEPALIVES``) or falls silent (``DEDICATED_SILENCE_S``).

        Any failure to connect counts as unavailable: a server starting up, shutting
        down or refusing connections for now is waited out like a network error.
        """
        try:
            conn = await connect(
                self.dsn,
                timeout=timeout,
                server_settings={"application_name": application_name, **DEDICATED_KEEPALIVES},
            )
        except (*CONNECTION_ERRORS, TimeoutError, asyncpg.PostgresError) as exc:
            raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
        try:
            with translated():
                if conn.get_server_version().major >= 14:
                    await conn.execute(
                        f"SET idle_session_timeout = '{DEDICATED_SILENCE_S}s'; "
                        f"SET idle_in_transaction_session_timeout = '{DEDICATED_SILENCE_S}s'; "
                        # A statement still running when its process gave up on it and
                        # closed the connection (a timeout) stops within a second,
                        # with the locks it holds, rather than running on for minutes.
                        "SET client_connection_check_interval = '1s'",
                        timeout=timeout,
                    )
                yield conn
        finally:
            conn.terminate()

    def describe(self) -> str:
        return describe(self.dsn)

    def pool_usage(self) -> tuple[int, int]:
        """(connections open, of which idle)."""
        return self.pool.get_size(), self.pool.get_idle_size()


async def pause(conn: asyncpg.Connection, seconds: float) -> None:
    """Wait ``seconds`` holding a dedicated connection, with a statement every
    ALIVE_EVERY_S: PostgreSQL would take a longer silence for a hung process."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > ALIVE_EVERY_S:
        await asyncio.sleep(ALIVE_EVERY_S)
        with translated():
            await conn.execute("SELECT 1", timeout=ALIVE_EVERY_S)
    await asyncio.sleep(max(0.0, left))


async def _silence(dsn: str, seconds: float) -> str:
    """Why connecting took ``seconds``, in words: whether the server's address takes a
    TCP connection at all (asyncpg's TimeoutError says neither, and says nothing)."""
    address = _tcp_address(dsn)
    if address is not None:
        try:
            async with asyncio.timeout(1.0):
                _, writer = await asyncio.open_connection(*address)
        except (OSError, TimeoutError):
            return (
                f"no connection within {seconds:g} s (nothing takes it at that address: "
                "a host down, or a firewall dropping it)"
            )
        writer.close()
        return (
            f"the server accepted the connection but did not answer within {seconds:g} s "
            "(stopped, hung or overloaded, or not PostgreSQL)"
        )
    return f"no answer within {seconds:g} s"


def _tcp_address(dsn: str) -> tuple[str, int] | None:
    """The one TCP host and port of a connection URL; None for a Unix socket, several
    hosts or one the URL does not name."""
    try:
        parts = urlsplit(dsn)
        host, port = parts.hostname, parts.port or 5432
    except ValueError:  # several hosts ("h1:5432,h2:5432"): not told apart here
        return None
    if not host or host.startswith("/") or "," in host or "host=" in parts.query:
        return None
    return host, port
