"""The one time format on the wire (CONTRACT: ISO-8601 UTC with a ``Z``), and how far a
device's clock may run ahead of the server's."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

# Ingest refuses a reading whose device time is further ahead than this of its arrival
# (pulse.ingest.validation); the history API counts on it (pulse.history.params).
MAX_CLOCK_AHEAD = timedelta(minutes=5)
# The earliest time there is: where a window meant as "for ever" keeps things from.
EARLIEST = datetime.min.replace(tzinfo=UTC)


def format_time(moment: datetime) -> str:
    """ISO-8601 UTC with milliseconds and ``Z``: ``2026-11-27T17:00:00.000Z``."""
    utc = moment.astimezone(UTC)
    # Not strftime: glibc's %Y does not pad years before 1000 to four digits.
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T{utc.hour:02d}:{utc.minute:02d}:"
        f"{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


def window_start(now: datetime, *, days: float = 0, hours: float = 0) -> datetime | None:
    """``now`` less a retention window, or None when that is before year 1: nothing is
    that old, so a window meant as "for ever" (PULSE_RETENTION_HOURS=99999999, or 1e300)
    keeps everything instead of failing (OverflowError) wherever it is subtracted."""
    try:
        return now - timedelta(days=days, hours=hours)
    except OverflowError:
        return None
