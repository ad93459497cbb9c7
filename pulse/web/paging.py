"""Keyset pages of a list: the ``limit`` and ``cursor`` parameters, and ``next_cursor``.

Every paged list (alerts, devices, alert rules) reads its parameters and cuts its
answer here, so that they all refuse the same values with the same sentences. A
page is cut after its last item's key (never OFFSET), so that items added while a
client pages through do not shift or repeat the pages that follow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pulse.errors import INVALID_PARAMETER, ApiError

MAX_ID = 2**63 - 1

T = TypeVar("T")
Item = TypeVar("Item", bound=Mapping[str, Any])


def page_limit(raw: str | None, *, default: int, upper: int) -> int:
    """The ``limit`` parameter: from 1 to ``upper``, ``default`` when absent."""
    return integer_parameter(raw, "limit", upper=upper) or default


def id_cursor(raw: str | None) -> int | None:
    """A ``cursor`` that is a row id (the last of the previous page); None when absent."""
    return integer_parameter(raw, "cursor", upper=MAX_ID)


def cursor_of(raw: str | None, parse: Callable[[str], T | None]) -> T | None:
    """A ``cursor`` read by ``parse`` (None from it: not a cursor); None when absent."""
    if raw is None or raw == "":
        return None
    value = parse(raw)
    if value is None:
        raise bad_parameter("cursor must be the next_cursor of a previous page.")
    return value


def cut(rows: Sequence[Item], limit: int, key: str) -> tuple[list[Item], str | None]:
    """A page of at most ``limit`` items from ``rows`` (fetched with ``limit + 1``: the
    one more tells there is a next page), and its ``next_cursor``: the last item's
    ``key``, or None on the last page."""
    page = list(rows[:limit])
    return page, str(page[-1][key]) if len(rows) > limit else None


def integer_parameter(raw: str | None, name: str, *, upper: int) -> int | None:
    """An optional integer query parameter from 1 to ``upper``; None when absent."""
    if raw is None or raw == "":
        return None
    value = positive(raw, upper)
    if value is None:
        raise bad_parameter(f"{name} must be an integer from 1 to {upper}.")
    return value


def positive(raw: str, upper: int = MAX_ID) -> int | None:
    """``raw`` as an integer from 1 to ``upper``; None for anything else."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not 1 <= int(raw) <= upper:
        return None
    return int(raw)


def bad_parameter(detail: str) -> ApiError:
    return ApiError(INVALID_PARAMETER, detail)
