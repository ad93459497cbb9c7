"""Named SQL blocks kept beside the code that runs them.

Each package that talks to the database has a ``queries.sql`` of blocks headed
``-- name: <name>``; the comment lines under the header say why the query is
shaped as it is. ``load_queries(__package__)`` returns them by name.
"""

from __future__ import annotations

import re
from importlib import resources

_HEADER = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


class Queries(dict[str, str]):
    def __missing__(self, name: str) -> str:
        raise KeyError(f"no query named {name!r}")


def parse_queries(text: str) -> Queries:
    queries = Queries()
    parts = _HEADER.split(text)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        sql = "\n".join(
            line for line in body.strip().splitlines() if not line.lstrip().startswith("--")
        ).strip()
        queries[name] = sql.rstrip(";")
    return queries


def load_queries(package: str | None) -> Queries:
    assert package, "call as load_queries(__package__)"
    return parse_queries(resources.files(package).joinpath("queries.sql").read_text("utf-8"))
