"""The shape of tenant ids, device ids and metric names (CONTRACT section 1)."""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def is_valid_name(value: object) -> bool:
    """True for 1 to 64 characters of [A-Za-z0-9_.:-]: tenant ids, device ids, metric names."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None
