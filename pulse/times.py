"""The one time format on the wire (CONTRACT: ISO-8601 UTC with a ``Z``), and how far a
device's clock may run ahead of the server's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

# Ingest refuses a reading whose device time is further ahead than this of its arrival
# (pulse.ingest.validation); the history API counts on it (pulse.history.params).
MAX_CLOCK_AHEAD = timedelta(minutes=5)


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``: ``2026-11-27T17:00:00.000Z``."""
    utc = moment.astimezone(UTC)
    # Not strftime: glibc's %Y does not pad years before 1000 to four digits.
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
        f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )
