"""The shape of tenant ids, device ids and metric names (CONTRACT section 1)."""

from __future__ import annotations

import functools
import re

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def is_valid_name(value: object) -> bool:
    """True for 1 to 64 characters of [A-Za-z0-9_.:-]: tenant ids, device ids, metric names."""
    return isinstance(value, str) and len(value) <= 64 and _is_valid(value)


# The same few names come in every batch: remembering the answers halves the cost
# of checking them. Only strings of at most 64 characters are kept, 8192 at most.
@functools.lru_cache(maxsize=8192)
def _is_valid(value: str) -> bool:
    return _NAME.fullmatch(value) is not None
