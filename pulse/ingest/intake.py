"""Request parts -> one Submission or Rejected per message: pure, no I/O.

The device URL, the heartbeat URL and every message of a batch go through
``_submission``, so a message is judged the same way whichever door it came in.
A body valid from end to end is taken by ``pulse.ingest.fast`` first, in one
compiled pass; the checks here find and name what is wrong with the others.
Checks run shape first (``invalid_payload``), then token presence
(``invalid_device_token``); the writer then checks the device and the token.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from functools import partial

from pulse.errors import INVALID_DEVICE_TOKEN, INVALID_PAYLOAD
from pulse.ingest import fast
from pulse.ingest.model import Rejected, Submission
from pulse.ingest.validation import (
    InvalidPayload,
    Reading,
    decode_json,
    is_string,
    parse_reading,
)
from pulse.names import is_valid_name

MAX_BATCH = fast.MAX_BATCH
# Where the device URL takes the token from; a batch message carries it as provision_token.
TOKEN_HEADER = "X-Provision-Token"
_NO_HEADER = f"The device's provision token is missing: send it in the {TOKEN_HEADER} header."
_NO_FIELD = "provision_token is missing."

Item = Submission | Rejected


def reading(
    tenant_id: str, device_id: str, token: str | None, body: bytes, received_at: datetime
) -> Item:
    """A reading posted to the device's own URL, its token in a header."""
    if token:
        submission = fast.reading(tenant_id, device_id, token, body, received_at)
        if submission is not None:
            return submission
    return checked_reading(tenant_id, device_id, token, body, received_at)


def checked_reading(
    tenant_id: str, device_id: str, token: str | None, body: bytes, received_at: datetime
) -> Item:
    """``reading``, checked field by field: what is wrong is named."""
    try:
        fields = decode_json(body)
    except InvalidPayload as exc:
        return Rejected(INVALID_PAYLOAD, exc.detail)
    read = partial(parse_reading, fields, received_at)
    return _submission(tenant_id, device_id, token, read, missing=_NO_HEADER)


def heartbeat(tenant_id: str, device_id: str, token: str | None) -> Item:
    """A heartbeat carries no reading; its body, if any, is ignored."""
    return _submission(tenant_id, device_id, token, None, missing=_NO_HEADER)


# What stands for the token of a message the MQTT broker authenticated: never
# compared with anything (Submission.broker), only there to take the same checks.
_BROKER = "broker-authenticated"


def broker_reading(tenant_id: str, device_id: str, body: bytes, received_at: datetime) -> Item:
    """A reading the MQTT broker took from the device's own topic, its payload a
    reading's body: the broker checked the device's credentials."""
    return _brokered(reading(tenant_id, device_id, _BROKER, body, received_at))


def broker_heartbeat(tenant_id: str, device_id: str) -> Item:
    """A heartbeat from the device's own MQTT topic; its payload, if any, is ignored."""
    return _brokered(heartbeat(tenant_id, device_id, _BROKER))


def _brokered(item: Item) -> Item:
    if isinstance(item, Submission):
        item.broker = True
    return item


def batch(body: bytes, received_at: datetime) -> list[Item] | Rejected:
    """The messages of a batch, each judged alone; Rejected when the envelope itself is wrong.

    A batch valid from end to end is taken fast; in any other, the envelope is checked
    as ``checked_batch`` does, and only the messages the fast path refuses are checked
    field by field: the answers are ``checked_batch``'s, message for message."""
    submissions = fast.batch(body, received_at)
    if submissions is not None:
        return list(submissions)
    try:
        messages = _messages(decode_json(body))
    except InvalidPayload as exc:
        return Rejected(INVALID_PAYLOAD, exc.detail)
    quick = fast.messages(body, received_at)
    # Both parsers take a key given twice at its last value; should they ever read the
    # envelope differently, every message is checked.
    if quick is None or len(quick) != len(messages):
        return [_message(message, received_at) for message in messages]
    return [
        submission if submission is not None else _message(message, received_at)
        for submission, message in zip(quick, messages, strict=True)
    ]


def checked_batch(body: bytes, received_at: datetime) -> list[Item] | Rejected:
    """``batch``, each message checked field by field: what is wrong is named."""
    try:
        messages = _messages(decode_json(body))
    except InvalidPayload as exc:
        return Rejected(INVALID_PAYLOAD, exc.detail)
    return [_message(message, received_at) for message in messages]


def _messages(envelope: object) -> list[object]:
    if not isinstance(envelope, dict) or set(envelope) != {"messages"}:
        raise InvalidPayload('The body must be a JSON object {"messages": [...]}.')
    messages = envelope["messages"]
    if not isinstance(messages, list):
        raise InvalidPayload("messages must be an array.")
    if not 1 <= len(messages) <= MAX_BATCH:
        raise InvalidPayload(
            f"messages has {len(messages)} entries; send 1 to {MAX_BATCH} per batch."
        )
    return messages


def _message(message: object, received_at: datetime) -> Item:
    if not isinstance(message, dict):
        return Rejected(INVALID_PAYLOAD, "A message must be a JSON object.")
    fields = dict(message)
    tenant_id = fields.pop("tenant_id", None)
    device_id = fields.pop("device_id", None)
    token = fields.pop("provision_token", None)
    read = partial(parse_reading, fields, received_at)
    return _submission(tenant_id, device_id, token, read, missing=_NO_FIELD)


def _submission(
    tenant_id: object,
    device_id: object,
    token: object,
    read: Callable[[], Reading] | None,
    *,
    missing: str,
) -> Item:
    """Check the ids, then the reading (``read``; None for a heartbeat), then the token."""
    try:
        tenant = _name("tenant_id", tenant_id)
        device = _name("device_id", device_id)
        parsed = None if read is None else read()
        if token is not None and not is_string(token):
            raise InvalidPayload("provision_token must be a string.")
    except InvalidPayload as exc:
        return Rejected(INVALID_PAYLOAD, exc.detail)
    if not token:
        return Rejected(INVALID_DEVICE_TOKEN, missing)
    return Submission(tenant, device, token, parsed)


def _name(field: str, value: object) -> str:
    if value is None:
        raise InvalidPayload(f"{field} is missing.")
    if not is_string(value) or not is_valid_name(value):
        shown = value if is_string(value) and len(value) <= 64 else "..."
        raise InvalidPayload(
            f"{field} {shown!r} is invalid; ids are 1 to 64 characters "
            "of letters, digits and _ . : -"
        )
    return value
