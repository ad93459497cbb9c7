"""Ingest admission: token buckets per device and per tenant, in process, with memory
bounded by evicting idle buckets."""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Hashable

from pulse.errors import RATE_LIMITED
from pulse.ingest.model import Rejected


@dataclasses.dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """``rate`` tokens a second, at most ``burst`` saved up, one bucket per key.

    A bucket left alone for ``burst / rate`` seconds is full again, which is
    exactly the state of a bucket that does not exist: forgetting it changes no
    answer. Buckets are kept least recently used first, so the idle ones are
    found at the front in amortised constant time. ``max_keys`` is a hard cap
    for floods of distinct keys; past it the least recently used bucket is
    forgotten early, which can only make the limiter more lenient.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst and max_keys >= 1")
        self.rate = rate
        self.burst = burst
        self._max_keys = max_keys
        self._refill_s = burst / rate
        self._clock = clock
        self._buckets: collections.OrderedDict[Hashable, _Bucket] = collections.OrderedDict()

    def acquire(self, key: Hashable) -> float:
        """Take one token for ``key``: 0.0 when allowed, else the seconds until one is available."""
        granted, wait_s = self.acquire_many(key, 1)
        return 0.0 if granted else wait_s

    def acquire_many(self, key: Hashable, count: int) -> tuple[int, float]:
        """Take up to ``count`` tokens for ``key``: how many, and when fewer, the seconds
        until the next one is available (0.0 when all were granted)."""
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            self._evict(now)
            bucket = buckets[key] = _Bucket(tokens=float(self.burst), updated=now)
        else:
            bucket.tokens = min(
                float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate
            )
            bucket.updated = now
            buckets.move_to_end(key)
        granted = min(count, int(bucket.tokens))
        bucket.tokens -= granted
        if granted == count:
            return granted, 0.0
        return granted, (1.0 - bucket.tokens) / self.rate

    def refund(self, key: Hashable, count: int = 1) -> None:
        """Give back tokens taken by ``acquire`` (the messages were refused elsewhere)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens = min(float(self.burst), bucket.tokens + count)

    def __len__(self) -> int:
        return len(self._buckets)

    def _evict(self, now: float) -> None:
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < self._refill_s and len(self._buckets) < self._max_keys:
                return
            self._buckets.popitem(last=False)


class Admission:
    """A message is admitted when both its device's and its tenant's buckets have a token.

    A message refused by the tenant's bucket gives its device's token back, so
    a busy tenant does not also eat into the budget of each of its devices.
    """

    def __init__(self, per_device: RateLimiter, per_tenant: RateLimiter) -> None:
        self.per_device = per_device
        self.per_tenant = per_tenant

    def __call__(self, device: tuple[str, str]) -> Rejected | None:
        """None admits the message; a refusal says which limit and how long to wait."""
        admitted, refusal = self.many(device, 1)
        return None if admitted else refusal

    def many(self, device: tuple[str, str], count: int) -> tuple[int, Rejected | None]:
        """Admit up to ``count`` messages of ``device`` (its first ones, in order): how
        many, and the refusal for the others (None when all are admitted)."""
        granted, wait_s = self.per_device.acquire_many(device, count)
        if granted < count:
            refusal: Rejected | None = _limited("This device", wait_s)
        else:
            refusal = None
        if granted:
            charged, tenant_wait_s = self.per_tenant.acquire_many(device[0], granted)
            if charged < granted:
                self.per_device.refund(device, granted - charged)
                granted, refusal = charged, _limited("This tenant", tenant_wait_s)
        return granted, refusal


def _limited(who: str, wait_s: float) -> Rejected:
    return Rejected(
        RATE_LIMITED,
        f"{who} is sending faster than its ingest rate limit; retry in {math.ceil(wait_s)} s.",
        retry_after_s=wait_s,
    )
