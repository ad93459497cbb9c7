"""What the database seam (pulse.db.database) raises, and the driver errors it translates."""

from __future__ import annotations

import asyncpg


class DatabaseUnavailable(Exception):
    """The database cannot be reached right now; the caller may retry."""


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
