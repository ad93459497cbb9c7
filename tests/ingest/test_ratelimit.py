from __future__ import annotations

import random

import pytest

from pulse.ingest.ratelimit import Admission, RateLimiter


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


def admission(clock: Clock, *, device_burst: int, tenant_burst: int) -> Admission:
    return Admission(
        per_device=RateLimiter(rate=1.0, burst=device_burst, clock=clock),
        per_tenant=RateLimiter(rate=1.0, burst=tenant_burst, clock=clock),
    )


def test_a_tenant_is_limited_across_its_devices() -> None:
    admit = admission(Clock(), device_burst=5, tenant_burst=3)
    assert [admit(("t1", f"d{i}")) for i in range(3)] == [None, None, None]
    refusal = admit(("t1", "d3"))
    assert refusal is not None
    assert refusal.reason.code == "rate_limited"
    assert refusal.retry_after_s == pytest.approx(1.0)
    assert "tenant" in refusal.detail
    # Another tenant has its own budget.
    assert admit(("t2", "d0")) is None


def test_a_device_is_limited_before_its_tenant_is_charged() -> None:
    clock = Clock()
    admit = admission(clock, device_burst=2, tenant_burst=3)
    assert [admit(("t1", "d1")) for _ in range(2)] == [None, None]
    refusal = admit(("t1", "d1"))
    assert refusal is not None and "device" in refusal.detail
    # The device's refusals did not spend the tenant's last token.
    assert admit(("t1", "d2")) is None
    assert admit(("t1", "d3")) is not None


def test_a_tenant_refusal_gives_the_device_its_token_back() -> None:
    clock = Clock()
    admit = admission(clock, device_burst=2, tenant_burst=2)
    assert admit(("t1", "d1")) is None
    assert admit(("t1", "d2")) is None
    for _ in range(10):
        assert admit(("t1", "d1")) is not None  # the tenant is out, d1 still has one
    clock.now += 1.0  # one tenant token back
    assert admit(("t1", "d1")) is None


@pytest.mark.parametrize("seed", range(20))
def test_one_call_for_many_devices_answers_as_one_call_each(seed: int) -> None:
    """``each`` charges each tenant once for all its devices; the answers are those of
    asking for the devices one at a time, in the same order."""
    rng = random.Random(seed)
    together = admission(Clock(), device_burst=6, tenant_burst=20)
    one_by_one = admission(Clock(), device_burst=6, tenant_burst=20)
    for _ in range(4):  # a few writes, so that buckets start part spent
        counts = {
            (f"t{rng.randrange(3)}", f"d{rng.randrange(8)}"): rng.randrange(1, 9)
            for _ in range(rng.randrange(1, 12))
        }
        expected = {}
        for device, count in counts.items():
            expected.update(one_by_one.each({device: count}))
        assert together.each(counts) == expected
    assert dict(together.per_device._buckets) == dict(one_by_one.per_device._buckets)
    assert dict(together.per_tenant._buckets) == dict(one_by_one.per_tenant._buckets)


def test_a_tenant_short_of_tokens_admits_its_devices_in_order() -> None:
    admit = admission(Clock(), device_burst=5, tenant_burst=6)
    refused = admit.each({("t1", "a"): 4, ("t2", "x"): 2, ("t1", "b"): 4, ("t1", "c"): 1})
    assert {device: granted for device, (granted, _) in refused.items()} == {
        ("t1", "b"): 2,
        ("t1", "c"): 0,
    }
    assert all("tenant" in refusal.detail for _, refusal in refused.values())
    # The devices refused for their tenant got their own tokens back.
    assert admit.per_device.acquire_each({("t1", "b"): 3, ("t1", "c"): 5}) == {}


def test_a_refund_gives_back_to_the_device_and_its_tenant_what_was_admitted() -> None:
    """For messages admitted and then not stored (their write answered 503): the
    integrity audit (LOW-2) found them charged all the same."""
    admit = admission(Clock(), device_burst=3, tenant_burst=4)
    assert admit.each({("t1", "d1"): 3, ("t1", "d2"): 1}) == {}
    assert admit.each({("t1", "d1"): 1, ("t1", "d2"): 1}).keys() == {("t1", "d1"), ("t1", "d2")}
    admit.refund({("t1", "d1"): 2, ("t1", "d2"): 1})
    assert admit.each({("t1", "d1"): 2, ("t1", "d2"): 1}) == {}
    # Never more than a full bucket.
    admit.refund({("t1", "d1"): 100})
    refused = admit.each({("t1", "d1"): 4})
    assert refused[("t1", "d1")][0] == 3
