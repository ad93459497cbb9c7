"""Exponential backoff with full jitter: each delay is uniform in [0, min(cap, base * 2**n)].

Full jitter spreads the reconnects of many clients that lost the same server at
the same moment, so a restarted server is not hit by all of them at once.
"""

from __future__ import annotations

import random
import time


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

    def after(self, retry_after_s: float) -> float:
        """The next delay, but never sooner than a server's ``Retry-After``: that plus up to
        half again, so that the clients it refused together do not all come back at the
        same moment (they did, all at +5.0 s after a 4029)."""
        delay = self.next_delay()
        if retry_after_s <= 0:
            return delay
        return max(delay, retry_after_s + self._rng.uniform(0, retry_after_s / 2))

    def reset(self) -> None:
        """After a connection that worked: the next failure starts from ``base_s`` again."""
        self.attempt = 0


class BusyWait:
    """Asking again a request the server was too busy to answer (``429 history_limit``,
    ``429 export_limit``, ``503``): after each answer's Retry-After (1 s without one,
    ``max_delay_s`` at most), for up to ``wait_s`` seconds in all from the first try.
    """

    def __init__(self, wait_s: float, *, max_delay_s: float = 60.0) -> None:
        self.wait_s = wait_s
        self.max_delay_s = max_delay_s
        self.waits = 0
        self._start = time.monotonic()
        self._deadline = self._start + wait_s

    def waited_s(self) -> float:
        return time.monotonic() - self._start

    def delay_s(self, retry_after_s: float | None) -> float | None:
        """How long to wait before asking again; None: past ``wait_s``, give up."""
        delay = min(self.max_delay_s, retry_after_s or 1.0)
        if time.monotonic() + delay > self._deadline:
            return None
        self.waits += 1
        return delay
