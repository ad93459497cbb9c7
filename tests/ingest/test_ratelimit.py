from __future__ import annotations

import pytest

from pulse.ingest.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_refill_at_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.acquire("d") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("d") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.acquire("d") == 0.0
    assert limiter.acquire("d") == pytest.approx(0.5)


def test_refill_never_exceeds_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10.0, burst=2, clock=clock)
    clock.now += 3600
    assert [limiter.acquire("d") > 0 for _ in range(3)] == [False, False, True]


def test_keys_are_independent() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, clock=Clock())
    assert limiter.acquire(("t1", "d1")) == 0.0
    assert limiter.acquire(("t1", "d1")) > 0
    assert limiter.acquire(("t2", "d1")) == 0.0
    assert limiter.acquire(("t1", "d2")) == 0.0


def test_idle_buckets_are_forgotten() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=5, clock=clock)
    for i in range(100):
        limiter.acquire(i)
    assert len(limiter) == 100
    clock.now += 5.0  # every bucket is full again
    limiter.acquire("fresh")
    assert len(limiter) == 1


def test_busy_buckets_are_kept() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=5, clock=clock)
    for _ in range(5):
        limiter.acquire("busy")
    clock.now += 4.0
    limiter.acquire("other")
    assert len(limiter) == 2
    assert limiter.acquire("busy") == 0.0  # 4 tokens back
    assert [limiter.acquire("busy") > 0 for _ in range(4)] == [False, False, False, True]


def test_hard_cap_on_keys() -> None:
    limiter = RateLimiter(rate=1.0, burst=5, max_keys=10, clock=Clock())
    for i in range(1000):
        limiter.acquire(i)
    assert len(limiter) <= 10


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_invalid_settings(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate=rate, burst=burst)
