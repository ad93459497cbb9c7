"""How a database is named in logs and errors: never its user or password."""

from __future__ import annotations

import pytest

from pulse.db.database import describe


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("postgres://user:secret@db.example:5432/pulse?sslmode=require", "db.example:5432/pulse"),
        ("postgresql://localhost/pulse", "localhost/pulse"),
        # From the operations audit: IPv6 without brackets, a Unix socket as localhost.
        ("postgresql://user:secret@[::1]:5433/pulse", "[::1]:5433/pulse"),
        ("postgresql:///pulse?host=/run/postgresql&port=5433", "/run/postgresql:5433/pulse"),
        ("postgresql://user:secret@%2Frun%2Fpostgresql/pulse", "/run/postgresql/pulse"),
        # Several hosts: `pulse migrate` applied, then failed naming them (the review).
        ("postgresql://user:secret@h1:5432,h2:5433/pulse", "h1:5432,h2:5433/pulse"),
        ("postgresql://user:secret@h1:5432,h2/pulse", "h1:5432,h2/pulse"),
        ("postgresql://user:secret@[::1]:5432,[::2]:5433/pulse", "[::1]:5432,[::2]:5433/pulse"),
        ("postgresql://user:secret@[::1/pulse", "the database"),
    ],
)
def test_a_database_is_named_by_where_it_is(url: str, named: str) -> None:
    assert describe(url) == named
    assert "secret" not in describe(url)
