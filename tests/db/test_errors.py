"""What the database seam raises for statements the server cancelled or aborted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg
import pytest

from pulse.db.errors import DatabaseTimeout, DatabaseUnavailable
from pulse.db.pool import create_pool
from pulse.logs import Throttled
from pulse.web import errors as web_errors
from tests.support import seam
from tests.web.db_proxy import database_proxy


@pytest.mark.parametrize("sqlstate", ["57014", "40P01", "40001"])
async def test_a_statement_cancelled_or_aborted_for_a_reason_that_passes_is_unavailable(
    pool: asyncpg.Pool, sqlstate: str
) -> None:
    """A query cancelled, a deadlock, a serialization failure: tried again, the statement
    goes through, so callers that wait out an unavailable database wait these out too."""
    raising = f"DO $$ BEGIN RAISE EXCEPTION 'passes' USING ERRCODE = '{sqlstate}'; END $$"
    with pytest.raises(DatabaseUnavailable):
        await seam(pool).execute(raising)


async def test_a_wrong_statement_passes_through(pool: asyncpg.Pool) -> None:
    with pytest.raises(asyncpg.UndefinedTableError):
        await seam(pool).execute("SELECT * FROM no_such_table")


async def test_a_statement_past_the_servers_statement_timeout_is_said_as_a_timeout(
    pool: asyncpg.Pool, said: Said
) -> None:
    """Security audit L2: a statement that timed out was answered and logged as "the
    database is unreachable", sending an operator to a healthy PostgreSQL. It waits here
    for a lock the test holds, until its statement_timeout cancels it (57014)."""
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(DatabaseUnavailable) as raised:
            async with seam(pool).transaction() as conn:
                await conn.execute("SET LOCAL statement_timeout = '100ms'")
                await conn.execute("SELECT count(*) FROM tenants")
    assert isinstance(raised.value.__cause__, asyncpg.QueryCanceledError)
    detail, line = said(raised.value)
    assert detail.startswith("The database took too long to answer"), detail
    assert detail.find("(the database is up)") > 0, detail
    assert line.startswith("database statement timed out"), line


async def test_a_statement_past_the_drivers_timeout_is_said_as_a_timeout(
    pool: asyncpg.Pool, said: Said
) -> None:
    """asyncpg's own timeout (command_timeout, 60 s for the pool: the audit's 340-reading
    batch): it cancels the statement and raises a TimeoutError without words."""
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(DatabaseUnavailable) as raised:
            await seam(pool).fetch("SELECT count(*) FROM tenants", timeout=0.1)
    assert isinstance(raised.value.__cause__, TimeoutError)
    detail, line = said(raised.value)
    assert detail.startswith("The database did not answer in time"), detail
    assert line.startswith("database did not answer within the statement's timeout"), line
    assert "is up" not in detail + line


async def test_a_frozen_database_is_not_said_to_be_up(database_url: str, said: Said) -> None:
    """Review of 4aaecd5: asyncpg's timeout fires alike when the server stopped answering
    (SIGSTOPped, its machine gone, the network cut), and the client was told "(the
    database is up)". Only the server's own statement_timeout shows it is up.

    And the statement's timeout is its caller's wait: asyncpg cancels a timed-out
    statement over a connection of its own, and its pool took the connection back (and
    let the caller go) only once the frozen server answered that, or after its
    command_timeout: this 0.5 s statement raised after 60 s. The connection goes back
    to the pool once the server answers again; meanwhile a statement waiting for it
    waits for its own timeout at most."""
    async with database_proxy(database_url) as proxy:
        pool = await create_pool(proxy.dsn, min_size=1, max_size=1)
        db = seam(pool)
        try:
            assert await db.fetchval("SELECT 1") == 1
            proxy.freeze()
            started = time.monotonic()
            with pytest.raises(DatabaseTimeout) as raised:
                await db.fetchval("SELECT 1", timeout=0.5)
            took = time.monotonic() - started
            # The next statement finds the pool's one connection still being cancelled:
            # its timeout bounds its wait for it too (65 s before, the review of 994a1a8),
            # said as no connection, not as a statement that did not answer.
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match=r"^no database connection within"):
                await db.fetchval("SELECT 1", timeout=0.5)
            took_next = time.monotonic() - started
            proxy.thaw()
            # The pool answers again (its connection, closed once its cancel went
            # unanswered for the statement's timeout, made again).
            assert await asyncio.wait_for(db.fetchval("SELECT 2"), 30) == 2
        finally:
            proxy.thaw()
            pool.terminate()
    assert took < 10 and took_next < 10, (took, took_next)  # command_timeout's 60 s before
    detail, line = said(raised.value)
    assert "is up" not in detail + line, (detail, line)
    assert detail.startswith("The database did not answer in time"), detail


async def test_a_statement_an_operator_cancelled_is_not_said_as_a_timeout(
    pool: asyncpg.Pool, said: Said
) -> None:
    cancelled = (
        "DO $$ BEGIN RAISE EXCEPTION 'canceling statement due to user request' "
        "USING ERRCODE = '57014'; END $$"
    )
    with pytest.raises(DatabaseUnavailable) as raised:
        await seam(pool).execute(cancelled)
    detail, line = said(raised.value)
    assert detail.startswith("The database is unreachable"), detail
    assert line.startswith("database unavailable"), line


async def test_a_statement_timeout_in_words_not_known_is_said_in_neutral_words(
    pool: asyncpg.Pool, said: Said
) -> None:
    """Review finding 7: the server's statement timeout is told by its English message.
    Under another lc_messages (German here) it was said as "unreachable"; it is said in
    the neutral words, which are still true, never as "the database is up"."""
    german = (
        "DO $$ BEGIN RAISE EXCEPTION 'storniere Anfrage wegen Zeitüberschreitung der "
        "Anweisung' USING ERRCODE = '57014'; END $$"
    )
    with pytest.raises(DatabaseTimeout) as raised:
        await seam(pool).execute(german)
    detail, line = said(raised.value)
    assert detail.startswith("The database did not answer in time"), detail
    assert "is up" not in detail + line, (detail, line)


Said = Callable[[DatabaseUnavailable], tuple[str, str]]


@pytest.fixture
def said(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Said:
    """How the web layer answers an error and logs it: the client's detail and the log
    line. Always the catalogue's 503 database_unavailable with
    Retry-After (a client retries a timeout as any 503); the words say which it was."""
    for throttle in ("_UNAVAILABLE", "_TIMED_OUT", "_NO_ANSWER"):  # said once per 10 s: said here
        monkeypatch.setattr(web_errors, throttle, Throttled(web_errors.log), raising=False)

    def said(exc: DatabaseUnavailable) -> tuple[str, str]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=web_errors.log.name):
            error = web_errors.error_for(exc)
        assert (error.status, error.error.code) == (503, "database_unavailable")
        assert error.headers == {"Retry-After": "2"}
        [line] = [r.getMessage() for r in caplog.records if r.name == web_errors.log.name]
        return error.detail or "", line

    return said
