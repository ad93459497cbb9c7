"""Ingest admission: token buckets per device and per tenant, in process, with memory
bounded by evicting idle buckets."""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

from pulse.errors import RATE_LIMITED
from pulse.ingest.model import Device, Rejected

K = TypeVar("K", bound=Hashable)


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
        short = self.acquire_each({key: 1})
        return short[key][1] if short else 0.0

    def acquire_each(self, counts: Mapping[K, int]) -> dict[K, tuple[int, float]]:
        """Take up to ``counts[key]`` tokens for each key, in order, at one moment: the
        keys granted fewer than asked, with how many and the seconds until the next token.

        A batch names hundreds of devices: one clock read and one call for all of
        them, not two calls per device."""
        now = self._clock()
        buckets = self._buckets
        burst, rate = float(self.burst), self.rate
        short: dict[K, tuple[int, float]] = {}
        for key, count in counts.items():
            bucket = buckets.get(key)
            if bucket is None:
                self._evict(now)
                bucket = buckets[key] = _Bucket(tokens=burst, updated=now)
            else:
                bucket.tokens = min(burst, bucket.tokens + (now - bucket.updated) * rate)
                bucket.updated = now
                buckets.move_to_end(key)
            granted = min(count, int(bucket.tokens))
            bucket.tokens -= granted
            if granted < count:
                short[key] = (granted, (1.0 - bucket.tokens) / rate)
        return short

    def refund(self, key: Hashable, count: int = 1) -> None:
        """Give back tokens taken by ``acquire`` (the messages were refused elsewhere, or
        not stored)."""
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

    def __call__(self, device: Device) -> Rejected | None:
        """None admits the message; a refusal says which limit and how long to wait."""
        refused = self.each({device: 1})
        return refused[device][1] if refused else None

    def each(self, counts: Mapping[Device, int]) -> dict[Device, tuple[int, Rejected]]:
        """Admit up to ``counts[device]`` messages of each device (its first ones), the
        devices in order: those admitted fewer than asked, with how many and the
        refusal for the others.

        Each tenant is charged once, for what its devices were granted; when its
        bucket falls short, its devices keep their grants in order until it is spent,
        and the others are refused for the tenant and given their tokens back."""
        refused = {
            device: (granted, _limited("This device", wait_s))
            for device, (granted, wait_s) in self.per_device.acquire_each(counts).items()
        }
        by_tenant: dict[str, int] = {}
        for device, count in counts.items():
            granted = refused[device][0] if device in refused else count
            by_tenant[device[0]] = by_tenant.get(device[0], 0) + granted
        for tenant, (charged, wait_s) in self.per_tenant.acquire_each(by_tenant).items():
            refusal = _limited("This tenant", wait_s)
            for device, count in counts.items():
                if device[0] != tenant:
                    continue
                granted = refused[device][0] if device in refused else count
                kept = min(granted, charged)
                charged -= kept
                if kept < granted:
                    self.per_device.refund(device, granted - kept)
                    refused[device] = (kept, refusal)
        return refused

    def refund(self, counts: Mapping[Device, int]) -> None:
        """Give back what ``each`` admitted for messages that were then not stored (their
        write was refused unavailable, or rolled back): ``counts[device]`` to the device
        and their sum to its tenant. A 503 is retried, and the retry is charged."""
        by_tenant: dict[str, int] = {}
        for device, count in counts.items():
            self.per_device.refund(device, count)
            by_tenant[device[0]] = by_tenant.get(device[0], 0) + count
        for tenant, count in by_tenant.items():
            self.per_tenant.refund(tenant, count)


def _limited(who: str, wait_s: float) -> Rejected:
    return Rejected(
        RATE_LIMITED,
        f"{who} is sending faster than its ingest rate limit; retry in {math.ceil(wait_s)} s.",
        retry_after_s=wait_s,
    )
