"""A device's reading, parsed and checked: pure, no I/O (CONTRACT section 3)."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import NoReturn

import msgspec
import orjson

from pulse.names import is_valid_name
from pulse.times import MAX_CLOCK_AHEAD, format_time

MAX_METRICS = 200
READING_FIELDS = ("ts", "metrics", "seq")

# seq is stored as bigint. Metric values go through orjson, which encodes
# integers up to 64 bits (signed or unsigned) and refuses anything larger.
_BIGINT = range(-(2**63), 2**63)
# A UTC offset down to the microsecond, as datetime.isoformat() writes one.
_OFFSET_WITH_FRACTION = re.compile(
    r"(?P<sign>[+-])(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)\.(?P<us>\d{1,6})$"
)
_JSON_INT = range(-(2**63), 2**64)

MetricValue = int | float | bool


class InvalidPayload(ValueError):
    """The request or message does not have the contract's shape (``invalid_payload``)."""

    code = "invalid_payload"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# msgspec Structs, for this and the other per-reading records of the write path
# (model.py): a 500-reading batch builds three per reading, and a Struct takes about
# 15 ns to build against about 100 ns for a slots dataclass (measured on 5 Dec 2026).
# gc=False: they hold no cycles. Nothing mutates them but the MQTT intake's flag.
class Reading(msgspec.Struct, gc=False):
    device_time: datetime
    metrics: dict[str, MetricValue]
    seq: int | None


def decode_json(body: bytes) -> object:
    if not body.strip():
        raise InvalidPayload("The body is empty; send a JSON object.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "infinity" in exc.msg:  # valid JSON, but no double holds it (1e400, 10**400)
            return _decode_beyond_doubles(body)
        if not _utf8(body):  # orjson would say "str is not valid UTF-8: surrogates ..."
            raise InvalidPayload("The payload is not valid UTF-8; send JSON in UTF-8.") from None
        raise InvalidPayload(f"The body is not valid JSON: {exc}.") from None


class _BeyondDouble:
    """What a number no double holds (1e400, an integer of 400 digits) is decoded as:
    valid JSON, so only the value is refused (each check takes it for the wrong kind of
    value, ``_json_kind``), not the whole body. A batch's other messages are judged as
    usual; it was once the whole batch's 400 (the integrity audit, LOW-1)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "BEYOND_DOUBLE"


_BEYOND_DOUBLE = _BeyondDouble()
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _decode_beyond_doubles(body: bytes) -> object:
    """A body orjson refused only for a number no double holds, decoded again by the
    standard library, each such number as ``_BEYOND_DOUBLE``; everything else as orjson
    reads it. Only ever after orjson has refused the body: the common path is orjson's.

    The standard library accepts what orjson refuses (NaN and Infinity, lone
    surrogates in escapes, UTF-16): those stay refused as not JSON, as orjson, which
    stopped at the first out-of-range number, would have refused them."""
    try:
        decoded = json.loads(
            body.decode(),  # UTF-8 only, surrogates refused (json.loads would guess UTF-16)
            parse_float=_double,
            parse_int=_integer,
            parse_constant=_not_json,
        )
    except UnicodeDecodeError:
        raise InvalidPayload("The payload is not valid UTF-8; send JSON in UTF-8.") from None
    except (ValueError, RecursionError) as exc:
        raise InvalidPayload(f"The body is not valid JSON: {exc}.") from None
    if _has_lone_surrogate(decoded):
        raise InvalidPayload(
            "The body is not valid JSON: a \\u escape is a lone surrogate (UTF-16 half)."
        )
    return decoded


def _double(text: str) -> float | _BeyondDouble:
    value = float(text)
    return value if math.isfinite(value) else _BEYOND_DOUBLE


def _integer(text: str) -> int | float | _BeyondDouble:
    # As orjson reads one: an integer when 64 bits hold it (signed or unsigned, at most
    # 21 characters with the sign), else a double, rounded. Never int() on hundreds of
    # digits (Python refuses more than 4300, and takes its time below that).
    if len(text) <= 21 and (value := int(text)) in _JSON_INT:
        return value
    return _double(text)


def _not_json(literal: str) -> NoReturn:
    raise ValueError(f"{literal} is not a JSON value")


def _has_lone_surrogate(decoded: object) -> bool:
    """Whether any string (a key or a value) holds a lone surrogate, which orjson
    refuses and the standard library decodes (it cannot be encoded back to UTF-8)."""
    stack = [decoded]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if _LONE_SURROGATE.search(value):
                return True
        elif isinstance(value, dict):
            stack += value
            stack += value.values()
        elif isinstance(value, list):
            stack += value
    return False


def _utf8(body: bytes) -> bool:
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return True


def parse_reading(body: object, received_at: datetime) -> Reading:
    """``{"ts"?, "metrics", "seq"?}`` -> Reading; a missing ts is ``received_at`` (UTC)."""
    if not isinstance(body, dict):
        raise InvalidPayload(f"A reading must be a JSON object, not {_json_kind(body)}.")
    # Unknown fields are refused rather than ignored, so that a typo such as
    # "timestamp" for "ts" is reported instead of silently using server time.
    unknown = [key for key in body if key not in READING_FIELDS]
    if unknown:
        raise InvalidPayload(
            f"Unknown field {_quote(unknown[0])}; a reading has 'ts', 'metrics' and 'seq'."
        )
    ts = body.get("ts")
    device_time = received_at if ts is None else parse_time(ts, received_at=received_at)
    return Reading(
        device_time=device_time,
        metrics=parse_metrics(body.get("metrics")),
        seq=parse_seq(body.get("seq")),
    )


def parse_time(value: object, *, received_at: datetime) -> datetime:
    if not isinstance(value, str):
        raise InvalidPayload(f"ts must be an ISO-8601 string, not {_json_kind(value)}.")
    try:
        # What the fast path (pulse.ingest.fast) reads, read as it reads it: a
        # lowercase "z", and more than six fractional digits rounded, not cut.
        parsed = msgspec.convert(value, datetime)
    except msgspec.ValidationError:
        try:  # RFC 3339 is the fast path's; ISO 8601 has more (offsets with seconds)
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise InvalidPayload(
                f"ts {_quote(value)} is not an ISO-8601 time such as '2026-11-27T17:00:00.000Z'."
            ) from None
    # A time without an offset could be any zone; guessing UTC would silently
    # shift every reading of a device whose clock is set to local time.
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InvalidPayload(f"ts {_quote(value)} has no UTC offset; end it with 'Z' or '+00:00'.")
    if match := _OFFSET_WITH_FRACTION.search(value):
        # Python 3.11 reads "+00:00:00.000001" as +00:00: the fraction is lost.
        offset = timedelta(
            hours=int(match["h"]),
            minutes=int(match["m"]),
            seconds=int(match["s"]),
            microseconds=int(match["us"].ljust(6, "0")),
        )
        parsed = parsed.replace(tzinfo=timezone(-offset if match["sign"] == "-" else offset))
    try:
        device_time = parsed.astimezone(UTC)
    except OverflowError:
        # Year 1 with a positive offset, or year 9999 with a negative one, is a
        # time that exists in no calendar Python (or the table) can hold in UTC.
        raise InvalidPayload(
            f"ts {_quote(value)} is outside the years 1 to 9999 once converted to UTC."
        ) from None
    if device_time - received_at > MAX_CLOCK_AHEAD:
        ahead = (device_time - received_at).total_seconds()
        raise InvalidPayload(
            f"ts {format_time(device_time)} is {ahead:.0f} s ahead of the server clock "
            f"({format_time(received_at)}); at most 5 minutes ahead is accepted."
        )
    return device_time


def parse_metrics(value: object) -> dict[str, MetricValue]:
    if value is None:
        raise InvalidPayload("metrics is missing; send an object of metric names to values.")
    if not isinstance(value, dict):
        raise InvalidPayload(f"metrics must be a JSON object, not {_json_kind(value)}.")
    if not value:
        raise InvalidPayload("metrics is empty; send at least one metric.")
    if len(value) > MAX_METRICS:
        raise InvalidPayload(
            f"metrics has {len(value)} entries; at most {MAX_METRICS} are accepted."
        )
    metrics: dict[str, MetricValue] = {}
    for name, metric in value.items():
        if not is_valid_name(name):
            raise InvalidPayload(
                f"Metric name {_quote(name)} is invalid; names are 1 to 64 characters "
                "of letters, digits and _ . : -"
            )
        if not is_metric_value(metric):
            raise InvalidPayload(
                f"Metric {_quote(name)} must be a finite number or a boolean, "
                f"not {_json_kind(metric)}."
            )
        metrics[name] = metric
    return metrics


def is_metric_value(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return value in _JSON_INT
    return isinstance(value, float) and math.isfinite(value)


def parse_seq(value: object) -> int | None:
    if value is None:
        return None
    # bool is a subclass of int in Python, but true is not a sequence number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"seq must be an integer, not {_json_kind(value)}.")
    if value not in _BIGINT:
        raise InvalidPayload("seq must fit in a signed 64-bit integer.")
    return value


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "an infinite number"
        return "a number" if value.is_integer() else "a number with a fraction"
    if isinstance(value, int):
        return "an integer" if value in _JSON_INT else "an integer beyond 64 bits"
    if isinstance(value, _BeyondDouble):
        return "a number beyond the range of a double (about 1.8e308 either side of zero)"
    return type(value).__name__


def _quote(value: object, limit: int = 64) -> str:
    # Names come from the client: echo them, but never a megabyte of them.
    text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")
