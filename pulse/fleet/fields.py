"""Field types the fleet's request bodies share."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from pulse.names import DOT_SEGMENTS, is_plain_text, is_valid_name


def _valid_name(value: str) -> str:
    if not is_valid_name(value):
        raise ValueError("must be 1 to 64 characters of [A-Za-z0-9_.:-]")
    return value


# A device id or metric name (CONTRACT section 1). The pattern is for the OpenAPI
# document (clients and fuzzers read it); the check is is_valid_name.
Name = Annotated[
    str,
    AfterValidator(_valid_name),
    Field(
        description="1 to 64 characters of [A-Za-z0-9_.:-]",
        json_schema_extra={"pattern": "^[A-Za-z0-9_.:-]{1,64}$"},
    ),
]


def _valid_id(value: str) -> str:
    if value in DOT_SEGMENTS:
        raise ValueError(f"must not be {value!r}: no URL can address it")
    return _valid_name(value)


# A new device's id: a Name a URL can carry.
DeviceId = Annotated[
    str,
    AfterValidator(_valid_id),
    Field(
        description='1 to 64 characters of [A-Za-z0-9_.:-], not "." nor ".."',
        json_schema_extra={"pattern": r"^(?!\.{1,2}$)[A-Za-z0-9_.:-]{1,64}$"},
    ),
]


def _plain_text(value: str) -> str:
    if not is_plain_text(value):
        raise ValueError(
            "must not contain control or invisible characters (such as NUL, ESC, the "
            "bidirectional overrides U+202A-U+202E and U+2066-U+2069, zero-width characters "
            "or the line separator U+2028)"
        )
    return value


# A label people type (a device's name or site, a rule's name); its length is the field's.
Text = Annotated[str, AfterValidator(_plain_text)]
# The same, bounded, for an optional field: the bound before the check, on the string
# (on the optional, pydantic says "at most 200 items after validation").
TextUpTo64 = Annotated[str, Field(max_length=64), AfterValidator(_plain_text)]
TextUpTo200 = Annotated[str, Field(max_length=200), AfterValidator(_plain_text)]
