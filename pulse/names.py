"""The shape of tenant ids, device ids and metric names (CONTRACT section 1), of free
text (device names, rule names, token subjects) that Pulse stores or logs, and of the
query parameters an endpoint takes."""

from __future__ import annotations

import functools
import itertools
import operator
import re
import unicodedata
from collections.abc import Iterable, Sequence

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# C0 controls (NUL among them), DEL, C1 controls, the bidirectional embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069: "Overheat<U+202E>: temp > 61"
# shows as "Overheat16 < pmet :" wherever the name is written), and UTF-16 surrogates,
# which a JSON string can carry alone ("\ud800") but UTF-8 cannot encode.
_NOT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# And the invisible: format characters (Cf: zero-width spaces and joiners, the
# directional marks, the soft hyphen, U+FEFF, tag characters; "ad<U+200B>min" shows as
# "admin") and the line and paragraph separators (Zl, Zp: U+2028 breaks a line
# wherever the name is written, and ends a JavaScript string literal in older engines).
_INVISIBLE = frozenset({"Cf", "Zl", "Zp"})
# Except those real text needs: the zero-width non-joiner and joiner (Persian and Indic
# words, emoji sequences such as 👩‍🔧) and the left-to-right, right-to-left and Arabic
# letter marks (a number after Hebrew or Arabic text).
_NEEDED = frozenset("\u200c\u200d\u200e\u200f\u061c")


def shown_name(value: str) -> str:
    """A name or id from a request, for an error sentence: as it is when it is valid,
    else quoted with its control and bidirectional characters escaped, cut short (a
    client that decodes the error must not print a terminal escape or reversed text)."""
    if is_valid_name(value):
        return value
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_valid_name(value: object) -> bool:
    """True for 1 to 64 characters of [A-Za-z0-9_.:-]: tenant ids, device ids, metric names."""
    return isinstance(value, str) and len(value) <= 64 and _is_valid(value)


# "." and ".." fit the pattern, but no URL can carry them as a path segment: browsers,
# curl and httpx remove such dot segments (RFC 3986, 5.2.4), percent-encoded too. A
# device so named was created with its token, then could post nothing and be neither
# deleted nor given a new token (a review, 8 December); a tenant so named, the same.
DOT_SEGMENTS = frozenset({".", ".."})


def is_valid_id(value: object) -> bool:
    """A tenant or device id a new one may take: a valid name, not "." nor ".."."""
    return is_valid_name(value) and value not in DOT_SEGMENTS


# The same few names come in every batch: remembering the answers halves the cost
# of checking them. Only strings of at most 64 characters are kept, 8192 at most.
@functools.lru_cache(maxsize=8192)
def _is_valid(value: str) -> bool:
    return _NAME.fullmatch(value) is not None


# Names, each followed by a newline (which no name holds), as ``first_invalid_name``
# joins them; possessive quantifiers: no backtracking, one pass.
_JOINED_NAMES = re.compile(r"(?:[A-Za-z0-9_.:-]{1,64}+\n)*+")


def first_invalid_name(values: Sequence[str]) -> int:
    """The position of the first of ``values`` that ``is_valid_name`` refuses, or
    ``len(values)`` when it takes them all: in a few passes of compiled code over them,
    not a call of Python per value. A batch can hold 1000 messages of 120 metrics each,
    and every name of a refused message was checked in Python: 0.35 s of the event
    loop per request, for anyone (the security audit, H1)."""
    if not values:
        return 0
    try:
        joined = "\n".join(values) + "\n"
    except TypeError:  # a value that is not a string: never a name decoded from JSON
        checks = list(map(is_valid_name, values))
        return checks.index(False) if False in checks else len(checks)
    if joined.count("\n") != len(values):
        # One of them holds a newline, so is invalid: the first such is the first
        # invalid one, unless one before it is.
        holding = list(map(operator.contains, values, itertools.repeat("\n"))).index(True)
        return first_invalid_name(values[:holding])
    valid = _JOINED_NAMES.match(joined)
    return joined.count("\n", 0, valid.end() if valid else 0)


def is_plain_text(value: str) -> bool:
    """True when ``value`` has no control character, no lone surrogate and no invisible
    character (Unicode categories Cf, Zl, Zp, but for the five real text needs):
    PostgreSQL refuses NUL and surrogates in text, a terminal obeys escape sequences,
    and a name with characters nobody sees passes for another."""
    if _NOT_TEXT.search(value) is not None:
        return False
    return value.isascii() or not any(
        unicodedata.category(c) in _INVISIBLE and c not in _NEEDED for c in value
    )


def unknown_parameter(given: Iterable[str], known: Sequence[str]) -> str | None:
    """The sentence for the first of ``given`` that is not in ``known``, None when all
    are: a misspelt filter (`device_ids`, another API's name) is refused, not ignored
    with the whole stream or range answered as if none had been given."""
    for name in given:
        if name not in known:
            takes = ", ".join(known[:-1]) + f" and {known[-1]}" if len(known) > 1 else known[0]
            return f"Unknown parameter {name[:64]!r}; this endpoint takes {takes}."
    return None
