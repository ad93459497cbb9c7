"""The one time format on the wire (CONTRACT: ISO-8601 UTC with a ``Z``)."""

from __future__ import annotations

from datetime import UTC, datetime


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``: ``2026-11-27T17:00:00.000Z``."""
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
