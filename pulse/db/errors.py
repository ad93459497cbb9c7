"""Driver errors are translated once, here, at the database seam."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
)

CONNECTION_ERRORS_OR_TIMEOUT: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, TimeoutError)


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise DatabaseUnavailable(str(exc) or type(exc).__name__) from exc
