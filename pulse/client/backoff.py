"""Exponential backoff with full jitter: each delay is uniform in [0, min(cap, base * 2**n)].

Full jitter spreads the reconnects of many clients that lost the same server at
the same moment, so a restarted server is not hit by all of them at once.
"""

from __future__ import annotations

import random


class Backoff:
    def __init__(
        self, base_s: float = 0.5, cap_s: float = 30.0, *, rng: random.Random | None = None
    ) -> None:
        if base_s <= 0 or cap_s < base_s:
            raise ValueError("need 0 < base_s <= cap_s")
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # min() before the power would overflow a float after ~1000 attempts.
        return min(self.cap_s, self.base_s * 2.0 ** min(self.attempt, 64))

    def next_delay(self) -> float:
        delay = self._rng.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """After a connection that worked: the next failure starts from ``base_s`` again."""
        self.attempt = 0
