"""What the database seam (pulse.db.database) raises, and the driver errors it translates."""

from __future__ import annotations

import asyncpg

from pulse.db.pool import ConnectTimeout


class DatabaseUnavailable(Exception):
    """The database cannot serve the statement right now (it cannot be reached, or it
    cancelled or aborted the statement for a reason that passes); the caller may retry."""


class DatabaseTimeout(DatabaseUnavailable):
    """A statement ran past its timeout: asyncpg's command_timeout or ``timeout=`` (the
    client's), or the server's statement_timeout. Said as a timeout, not as
    "unreachable": the security audit's batch against 1000 rules timed out and was
    logged as an outage, sending an operator to a healthy PostgreSQL. A
    DatabaseUnavailable still (the statement may go through when retried, and nothing of
    a write refused with it was stored).

    ``database_up``: the server itself cancelled the statement for its statement_timeout
    (57014), so it is up and answering. The client's timeout fires alike whether the
    statement is slow or the server stopped answering (frozen, its machine gone, the
    network cut), so it says neither: the review of 4aaecd5 froze the database and was
    told "the database is up"."""

    def __init__(self, message: str, *, database_up: bool = False) -> None:
        super().__init__(message)
        self.database_up = database_up


# Errors that mean "the connection or the server is gone", not "your query is wrong".
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # Raised by the pool when it cannot reset or release a connection whose
    # server went away mid-transaction.
    asyncpg.InternalClientError,
    # States of the server that pass, whatever the statement: read-only (a standby
    # promoted late after a failover, default_transaction_read_only), the database
    # gone for a while, not accepting connections (55000; but 55P03, a lock_timeout
    # of ours, is the caller's: database.translated), out of disk or memory, an I/O
    # error.
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InvalidCatalogNameError,  # 3D000 at connect: the database renamed or dropped
    asyncpg.ObjectNotInPrerequisiteStateError,
    asyncpg.InsufficientResourcesError,
    asyncpg.PostgresSystemError,
)

# Statements the server cancelled or aborted for a reason that passes, whatever the
# statement: tried again, they go through. A query cancelled (57014: an operator's
# pg_cancel_backend, a statement_timeout), a deadlock (40P01) or a serialization
# failure (40001) broken by aborting this transaction.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.QueryCanceledError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


def passes(exc: BaseException) -> bool:
    """Whether the same statements, tried again later, may succeed: the database was
    unavailable, or a lock_timeout (55P03, which ``translated`` leaves to the caller)."""
    return isinstance(exc, DatabaseUnavailable | asyncpg.LockNotAvailableError)


def refusal(exc: asyncpg.PostgresError, *, migrating: bool) -> str:
    """A statement Pulse needs at its start refused by the server, in one line with what
    to do: a permission missing (InsufficientPrivilegeError, 42501: a role that does not
    own the schema has no CREATE on it from PostgreSQL 15; SELECT revoked on a table),
    or any other error of the server. It was a traceback, ending in the driver's error."""
    said = f"{exc} ({type(exc).__name__})"
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        if migrating:
            return (
                f"{said}: run `pulse migrate` as the database's owner (or a role that may "
                "create tables in its schema: GRANT CREATE ON SCHEMA public TO the role)"
            )
        # Not grants on the tables: the role makes and drops telemetry's days, which
        # only the table's owner and its members may (pulse.db.retention).
        return (
            f"{said}: serve as the role that ran `pulse migrate`, or as a member of it "
            "(GRANT that role TO this one)"
        )
    return f"{said}, SQLSTATE {exc.sqlstate}"


def statement_timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a statement's timeout: asyncpg's own (a TimeoutError without
    words; a connection's, ConnectTimeout, has its own) or a 57014 other than an
    operator's pg_cancel_backend ("canceling statement due to user request"): the
    server's statement_timeout, said as up when ``cancelled_by_statement_timeout``
    recognises it, and otherwise in neutral words.

    57014 has no code of its own for either: they are told by the server's English
    words. Under a non-English ``lc_messages`` (Pulse sets none) neither is recognised,
    so a server-side statement timeout is said in the client timeout's neutral words
    ("did not answer in time (slow, or not answering)": true, if less than the server
    could say), and so is an operator's cancel (not "unreachable", as in English)."""
    if isinstance(exc, TimeoutError):
        return not isinstance(exc, ConnectTimeout)
    return isinstance(exc, asyncpg.QueryCanceledError) and "user request" not in str(exc)


def cancelled_by_statement_timeout(exc: BaseException) -> bool:
    """Whether the server cancelled the statement for its statement_timeout (57014,
    "canceling statement due to statement timeout"): the one timeout that shows the
    server is up. Told by English words only (``statement_timed_out``)."""
    return isinstance(exc, asyncpg.QueryCanceledError) and "statement timeout" in str(exc)
