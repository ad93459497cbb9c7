"""The common case of intake, decoded and checked in one pass of compiled code.

A batch or reading that is valid from end to end, which is nearly all of them,
is decoded by msgspec straight into the shapes below, with every check that
can be declared (types, lengths, ranges, unknown fields, time zones) made while
decoding; what remains (names, the clock) is checked here on the distinct
values only. Anything these shapes refuse goes to the per-message path of
``pulse.ingest.intake``, which finds what is wrong with each message and says
so: the fast path decides nothing the slow one would decide differently, and
``tests/ingest/test_fast.py`` holds the two against each other.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import msgspec

from pulse.ingest.model import Submission
from pulse.ingest.validation import MAX_METRICS, Reading
from pulse.names import is_valid_name
from pulse.times import MAX_CLOCK_AHEAD

MAX_BATCH = 1000

# The checks shared with pulse.ingest.validation, declared.
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_Finite = Annotated[float, msgspec.Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)]
# Signed 64-bit integers; others (unsigned 64-bit ones, which orjson also stores as
# integers, and larger ones, which it reads as floats) go the checked way.
_Integer = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
_Metrics = Annotated[
    dict[_Name, _Integer | _Finite | bool], msgspec.Meta(min_length=1, max_length=MAX_METRICS)
]
_Time = Annotated[datetime, msgspec.Meta(tz=True)]
_Seq = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Reading(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    metrics: _Metrics
    ts: _Time | None = None
    seq: _Seq | None = None


class _Message(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    tenant_id: _Name
    device_id: _Name
    provision_token: Annotated[str, msgspec.Meta(min_length=1)]
    metrics: _Metrics
    ts: _Time | None = None
    seq: _Seq | None = None


class _Batch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    messages: Annotated[list[_Message], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


class _RawBatch(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    messages: Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_BATCH)]


_READING = msgspec.json.Decoder(_Reading)
_BATCH = msgspec.json.Decoder(_Batch)
_RAW_BATCH = msgspec.json.Decoder(_RawBatch)
_MESSAGE = msgspec.json.Decoder(_Message)


def reading(
    tenant_id: str, device_id: str, token: str, body: bytes, received_at: datetime
) -> Submission | None:
    """The submission of a valid reading to a device's URL; None: ask the slow path."""
    try:
        decoded = _READING.decode(body)
    except msgspec.MsgspecError:
        return None
    if not (is_valid_name(tenant_id) and is_valid_name(device_id)):
        return None
    if not all(map(is_valid_name, decoded.metrics)):
        return None
    device_time = _device_time(decoded.ts, received_at)
    if device_time is None:
        return None
    return Submission(
        tenant_id, device_id, token, Reading(device_time, decoded.metrics, decoded.seq)
    )


def batch(body: bytes, received_at: datetime) -> list[Submission] | None:
    """The submissions of a batch whose every message is valid; None: ask the slow path."""
    try:
        messages = _BATCH.decode(body).messages
    except msgspec.MsgspecError:
        return None
    # Ids and metric names repeat across a batch: each distinct one is checked once.
    names = {m.tenant_id for m in messages} | {m.device_id for m in messages}
    for message in messages:
        names.update(message.metrics)
    if not all(map(is_valid_name, names)):
        return None
    submissions = []
    for m in messages:
        device_time = received_at if m.ts is None else _device_time(m.ts, received_at)
        if device_time is None:
            return None
        submissions.append(
            Submission(
                m.tenant_id, m.device_id, m.provision_token, Reading(device_time, m.metrics, m.seq)
            )
        )
    return submissions


# Messages refused here beyond those taken, after which the rest of a batch is left to
# the slow path untried: a batch of nothing but invalid messages costs little more than
# it did when any invalid message sent the whole batch the slow way.
_MISSES = 8


def messages(body: bytes, received_at: datetime) -> list[Submission | None] | None:
    """A batch some of whose messages are not valid: each message's submission, taken
    as ``batch`` would take it, or None where the slow path must judge that message.
    None for a body whose envelope this cannot read (the slow path judges it all).

    One message that ``batch`` refuses used to send its 999 neighbours the checked
    way too, for anyone (the security audit, M1)."""
    try:
        raws = _RAW_BATCH.decode(body).messages
    except msgspec.MsgspecError:
        return None
    taken: list[Submission | None] = []
    balance = 0  # refused minus taken
    for raw in raws:
        submission = _message(raw, received_at) if balance < _MISSES else None
        balance += 1 if submission is None else -1
        taken.append(submission)
    return taken


def _message(raw: msgspec.Raw, received_at: datetime) -> Submission | None:
    try:
        m = _MESSAGE.decode(raw)
    except msgspec.MsgspecError:
        return None
    if not (is_valid_name(m.tenant_id) and is_valid_name(m.device_id)):
        return None
    if not all(map(is_valid_name, m.metrics)):
        return None
    device_time = _device_time(m.ts, received_at)
    if device_time is None:
        return None
    return Submission(
        m.tenant_id, m.device_id, m.provision_token, Reading(device_time, m.metrics, m.seq)
    )


def _device_time(ts: datetime | None, received_at: datetime) -> datetime | None:
    """The device's time in UTC, if the slow path would accept it; else None."""
    if ts is None:
        return received_at
    try:
        device_time = ts.astimezone(UTC)
    except OverflowError:
        return None
    if device_time - received_at > MAX_CLOCK_AHEAD:
        return None
    return device_time
