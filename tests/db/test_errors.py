"""What the database seam raises for statements the server cancelled or aborted."""

from __future__ import annotations

import asyncpg
import pytest

from pulse.db.errors import DatabaseUnavailable
from tests.support import seam


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
