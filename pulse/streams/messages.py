"""Inbound WebSocket messages, shared by both WebSocket protocols. Pure: no I/O.

Every inbound frame is a JSON object or gets an ``error`` message back
(CONTRACT section 5); the sentences are here so both protocols say the same.
"""

from __future__ import annotations

from typing import Any

import orjson

from pulse.names import is_valid_name

# Inbound frames over this many bytes close the connection with 1009.
MAX_INBOUND_BYTES = 64 * 1024

# The reasons of the two closes RFC 6455 has for a frame itself, sent by the app or by
# the WebSocket layer before the app sees the frame (pulse.serving.websocket), the same
# either way: a sentence for the developer reading CloseEvent.reason (at most 123 bytes).
MESSAGE_TOO_BIG_REASON = f"Messages are limited to {MAX_INBOUND_BYTES} bytes."
INVALID_UTF8_REASON = "Text frames and close reasons must be valid UTF-8."


class BadMessage(ValueError):
    """An inbound message the protocol cannot act on; ``str(exc)`` is the sentence to send."""


def decode(data: str | bytes) -> dict[str, Any]:
    """The JSON object in a text frame, or BadMessage."""
    if isinstance(data, bytes):
        raise BadMessage("Binary frames are not accepted; send JSON objects as text frames.")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadMessage("The message is not valid JSON.") from None
    if not isinstance(value, dict):
        raise BadMessage("The message must be a JSON object.")
    return value


def error(sentence: str) -> dict[str, str]:
    return {"type": "error", "message": sentence}


def shown(value: object) -> str:
    """A client's value, quoted and cut short, for an error sentence."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def action_of(message: dict[str, Any], known: tuple[str, ...]) -> str:
    action = message.get("action")
    if action not in known:
        if action is None:
            raise BadMessage("The message has no action; use one of " + ", ".join(known) + ".")
        raise BadMessage(f"Unknown action {shown(action)}; use one of " + ", ".join(known) + ".")
    return str(action)


def name_list(
    message: dict[str, Any], plural: str, *, single: str | None = None, what: str
) -> list[str]:
    """The names in ``plural`` (a list of strings) and ``single`` (one string), in order,
    each once; BadMessage when one is malformed."""
    names: list[Any] = []
    if single is not None and message.get(single) is not None:
        names.append(message[single])
    values = message.get(plural)
    if values is not None:
        if not isinstance(values, list):
            raise BadMessage(f"{plural} must be a list of {what}s.")
        names.extend(values)
    for name in names:
        if not is_valid_name(name):
            raise BadMessage(
                f"The {what} {shown(name)} is not 1 to 64 characters of [A-Za-z0-9_.:-]."
            )
    return list(dict.fromkeys(names))
