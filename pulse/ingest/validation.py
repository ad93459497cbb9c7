"""A device's reading, parsed and checked: pure, no I/O (CONTRACT section 3)."""

from __future__ import annotations

import math
import re
import secrets
from datetime import UTC, datetime, timedelta, timezone
from typing import TypeGuard

import msgspec
import orjson

from pulse.names import first_invalid_name, is_valid_name
from pulse.times import MAX_CLOCK_AHEAD, format_time

MAX_METRICS = 200
READING_FIELDS = ("ts", "metrics", "seq")

# seq is stored as bigint. Metric values go through orjson, which encodes
# integers up to 64 bits (signed or unsigned) and refuses anything larger.
# (Compared, not `in range(...)`: for an int subclass that is a walk through the range.)
_BIGINT = (-(2**63), 2**63)
# A UTC offset down to the microsecond, as datetime.isoformat() writes one.
_OFFSET_WITH_FRACTION = re.compile(
    r"(?P<sign>[+-])(?P<h>\d\d):(?P<m>\d\d):(?P<s>\d\d)\.(?P<us>\d{1,6})$"
)
_JSON_INT = (-(2**63), 2**64)

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
        if "infinity" not in exc.msg:
            raise _not_json(body, str(exc)) from None
    # Valid JSON, perhaps, but a number of it no double holds (1e400, 10**400).
    try:
        return orjson.loads(_beyond_doubles_replaced(body))
    except orjson.JSONDecodeError as exc:
        # Without the position: it would be one in the body as rewritten.
        raise _not_json(body, exc.msg) from None


def _not_json(body: bytes, error: str) -> InvalidPayload:
    if not _utf8(body):  # orjson would say "str is not valid UTF-8: surrogates ..."
        return InvalidPayload("The payload is not valid UTF-8; send JSON in UTF-8.")
    return InvalidPayload(f"The body is not valid JSON: {error}.")


# What a number no double holds (1e400, an integer of 400 digits) is decoded as: valid
# JSON, so only the value is refused, not the whole body, and in a batch only its message
# (it was once the whole batch's 400: the integrity audit, LOW-1). A string, which orjson
# decodes, that every check takes for what it stands for (``_json_kind``, ``is_string``):
# a NUL and a secret drawn when the process starts. No device can send it, for it is
# never shown: no check quotes it, and none reads it as a string (review MEDIUM-3).
BEYOND_DOUBLE = "\x00" + secrets.token_urlsafe(16)
_BEYOND_DOUBLE_JSON = orjson.dumps(BEYOND_DOUBLE)  # b'"\\u0000...'
_BEYOND_DOUBLE_KIND = "a number beyond the range of a double (about 1.8e308 either side of zero)"

# What may be a number beyond a double's range, outside strings: an exponent of 100 or
# more, or a run of 200 digits (marked by a NUL, ``_digit_runs_marked``); a number with
# neither is below 1e298. In one pass from the start of the body, everything else is
# skipped: strings whole, e's of true, false and smaller exponents, and all the rest
# (digits and all) in runs, so a body of small numbers costs no step per number. Every
# quantifier is possessive: no backtracking, the pass is linear.
_MAYBE_BEYOND = re.compile(
    rb"""
    (?:
        [^"eE\x00]++                        # neither a string, nor an e, nor a long run
      | "(?:[^"\\]++|\\.)*+"?             # a string, escapes and all (unclosed: the rest)
      | [eE](?!\+?+0*+[1-9][0-9]{2})       # the e of true, false or of 1e99, 1e-400
    )*+
    ((?:[eE]\+?+0*+[1-9][0-9]{2}|\x00)[0-9.eE+\x00-]*+)?  # the rest of the number from there
    """,
    re.VERBOSE | re.DOTALL,
)
_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?+(?:[eE][+-]?+[0-9]++)?+")
_NUMBER_CHARS = b"0123456789.eE+-"
_DIGITS_AS_ZEROS = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 200
# The numbers of 1e100 or more (or written so) beyond which a body that also holds one
# no double holds is refused whole, as every such body once was: each costs a step in
# Python, and a body of 170,000 of them (1 MB of "1e400,") would cost 100 ms.
MAX_LARGE_NUMBERS = 10_000


def _beyond_doubles_replaced(body: bytes) -> bytes:
    """The body with each number no double holds (outside strings) written as
    ``BEYOND_DOUBLE``. Only ever after orjson has refused the body for such a number:
    the common path is orjson's, and what orjson refuses besides (NaN, Infinity, lone
    surrogates, UTF-16, a leading zero) it still refuses when it decodes this body.

    A number is rewritten when it is a whole JSON number token (the longest run of
    number characters there, valid as a number) and ``float`` takes it for an infinity,
    as orjson does (an integer beyond 64 bits orjson reads as a double). Put a string
    value in place of a valid number token and the body is valid only if it was valid
    with the number: nothing makes JSON of what was not."""
    if b"\x00" in body:  # never in JSON, raw; here it marks the long runs of digits
        raise InvalidPayload("The body is not valid JSON: it holds a NUL byte.")
    marked = _digit_runs_marked(body)
    pieces: list[bytes] = []
    copied = 0  # the body up to here is in pieces
    verdicts: dict[bytes, bool] = {}
    for count, match in enumerate(_MAYBE_BEYOND.finditer(marked)):
        rest, end = match.span(1)
        if rest < 0:  # the end of the body
            break
        if count == MAX_LARGE_NUMBERS:
            raise InvalidPayload(
                f"The body holds a number beyond the range of a double (about 1.8e308 "
                f"either side of zero) and more than {MAX_LARGE_NUMBERS} numbers "
                "written with an exponent of 100 or more or with 200 digits in a row; "
                "such a body is refused whole."
            )
        skipped = marked[match.start() : rest]
        start = match.start() + len(skipped.rstrip(_NUMBER_CHARS))
        token = body[start:end]
        beyond = verdicts.get(token)
        if beyond is None:
            beyond = verdicts[token] = bool(_NUMBER.fullmatch(token) and math.isinf(float(token)))
        if beyond:
            pieces += (body[copied:start], _BEYOND_DOUBLE_JSON)
            copied = end
    pieces.append(body[copied:])
    return b"".join(pieces)


def _digit_runs_marked(body: bytes) -> bytes:
    """The body with a NUL for the first digit of every run of 200 digits (and every
    200th digit after it), in strings or not: what ``_MAYBE_BEYOND`` stops at."""
    zeros = body.translate(_DIGITS_AS_ZEROS)
    at = zeros.find(_LONG_RUN)
    if at < 0:
        return body
    marked = bytearray(body)
    while at >= 0:  # at most one a 200 bytes
        marked[at] = 0
        at = zeros.find(_LONG_RUN, at + len(_LONG_RUN))
    return bytes(marked)


def is_string(value: object) -> TypeGuard[str]:
    """Whether a decoded value is a JSON string of the body, not ``BEYOND_DOUBLE``."""
    return isinstance(value, str) and value != BEYOND_DOUBLE


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
    if not is_string(value):
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
    # A message is refused for its first wrong metric. Past the first, which is checked
    # as it is named, that one is found in compiled code: however many metrics come
    # before it, they cost no step of Python each (the security audit, H1).
    name, metric = next(iter(value.items()))
    if is_valid_name(name) and is_metric_value(metric):
        names, values = list(value), list(value.values())
        wrong_value = first_invalid_value(values)
        wrong = min(first_invalid_name(names[: wrong_value + 1]), wrong_value)
        if wrong == len(names):
            return dict(value)
        name, metric = names[wrong], values[wrong]
    if not is_valid_name(name):
        raise InvalidPayload(
            f"Metric name {_quote(name)} is invalid; names are 1 to 64 characters "
            "of letters, digits and _ . : -"
        )
    raise InvalidPayload(
        f"Metric {_quote(name)} must be a finite number or a boolean, not {_json_kind(metric)}."
    )


def is_metric_value(value: object) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return _JSON_INT[0] <= value < _JSON_INT[1]
    return isinstance(value, float) and math.isfinite(value)


_NUMBERS = frozenset({bool, int, float})


def first_invalid_value(values: list[object]) -> int:
    """The position of the first of ``values`` that ``is_metric_value`` refuses, or
    ``len(values)`` when it takes them all, found as ``first_invalid_name`` finds a name:
    without a call of Python per value."""
    if set(map(type, values)) <= _NUMBERS:
        end, numbers = len(values), values
    else:
        end = list(map(_NUMBERS.__contains__, map(type, values))).index(False)
        numbers = values[:end]
    # Up to there, each is a bool, an int or a float, which is valid unless not finite or
    # wider than 64 bits, and never so decoded from JSON. orjson writes those and only
    # those as null or refuses them, as the writer would.
    try:
        fit = b"null" not in orjson.dumps(numbers)
    except orjson.JSONEncodeError:
        fit = False
    if fit and (end == len(values) or not isinstance(values[end], int | float)):
        return end
    # A subclass of int or float, or a number out of range: not from JSON.
    return next((i for i, v in enumerate(values) if not is_metric_value(v)), len(values))


def parse_seq(value: object) -> int | None:
    if value is None:
        return None
    # bool is a subclass of int in Python, but true is not a sequence number.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidPayload(f"seq must be an integer, not {_json_kind(value)}.")
    if not _BIGINT[0] <= value < _BIGINT[1]:
        raise InvalidPayload("seq must fit in a signed 64-bit integer.")
    return value


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string" if value != BEYOND_DOUBLE else _BEYOND_DOUBLE_KIND
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
        return "an integer" if _JSON_INT[0] <= value < _JSON_INT[1] else "an integer beyond 64 bits"
    return type(value).__name__


def _quote(value: object, limit: int = 64) -> str:
    # Names come from the client: echo them, but never a megabyte of them.
    text = value if isinstance(value, str) else repr(value)
    return repr(text if len(text) <= limit else text[:limit] + "...")
