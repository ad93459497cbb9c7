"""Query parameters shared by the telemetry streams: filters and resume positions."""

from __future__ import annotations

from collections.abc import Mapping

from pulse.bus.subscription import Filters
from pulse.names import is_valid_name, unknown_parameter

# What a stream's URL may carry (CONTRACT sections 1, 4 and 7).
STREAM_PARAMETERS = ("device_id", "metric", "last_event_id", "tenant_id", "ticket", "token")


class BadParameter(ValueError):
    pass


def parse_names(raw: str | None, what: str, *, limit: int | None = None) -> frozenset[str] | None:
    """A comma-separated list of names; None (no filter) when absent or empty."""
    if raw is None or not raw.strip():
        return None
    names = [part.strip() for part in raw.split(",") if part.strip()]
    for name in names:
        if not is_valid_name(name):
            raise BadParameter(
                f"{what} {name[:80]!r} is not 1 to 64 characters of [A-Za-z0-9_.:-]."
            )
    if limit is not None and len(set(names)) > limit:
        raise BadParameter(f"At most {limit} {what}s can be filtered on one connection.")
    return frozenset(names)


def parse_filters(args: Mapping[str, str], *, max_device_filters: int) -> Filters:
    """The filters of a stream's URL, whose every parameter must be a stream's."""
    unknown = unknown_parameter(args, STREAM_PARAMETERS)
    if unknown is not None:
        raise BadParameter(unknown)
    return Filters(
        device_ids=parse_names(args.get("device_id"), "device id", limit=max_device_filters),
        metrics=parse_names(args.get("metric"), "metric"),
    )


MAX_EVENT_ID = 2**63 - 1  # event ids are bigints


def parse_event_id(raw: str | None) -> int | None:
    if raw is None or raw.strip() == "":
        return None
    raw = raw.strip()
    # ASCII only: str.isdigit() is also true of '²' (which int() refuses) and of
    # Arabic-Indic or fullwidth digits (which int() silently reads as numbers).
    if not (raw.isascii() and raw.isdigit()):
        raise BadParameter("The last event id must be a non-negative integer.")
    # Beyond a bigint no tenant's newest id can be: as far ahead as any (unknown_position).
    return MAX_EVENT_ID if len(raw) > 19 else min(int(raw), MAX_EVENT_ID)
