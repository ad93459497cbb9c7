"""Backoff: full jitter under an exponential ceiling that stops at the cap."""

from __future__ import annotations

import asyncio
import random
import statistics
from collections.abc import AsyncIterator

import pytest

from pulse.client import Backoff, Notice, PulseClient
from pulse.client.credentials import Credentials
from pulse.client.stream import Reconnect, ReconnectingStream
from tests.support import free_port


def test_ceiling_doubles_then_stays_at_the_cap() -> None:
    backoff = Backoff(0.5, 4.0, rng=random.Random(1))
    ceilings = []
    for _ in range(8):
        ceilings.append(backoff.ceiling())
        backoff.next_delay()
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    backoff.reset()
    assert backoff.ceiling() == 0.5


def test_delays_are_full_jitter_below_the_ceiling() -> None:
    rng = random.Random(7)
    samples = []
    for _ in range(2000):
        backoff = Backoff(1.0, 8.0, rng=rng)
        for _ in range(5):  # the fifth delay is drawn under the cap: min(8, 1 * 2**4)
            delay = backoff.next_delay()
        samples.append(delay)
    assert all(0 <= d <= 8.0 for d in samples)
    # Uniform on [0, 8]: spread over the whole range, not clustered near the ceiling.
    assert min(samples) < 0.1 and max(samples) > 7.9
    assert statistics.mean(samples) == pytest.approx(4.0, abs=0.3)
    assert len(set(samples)) == len(samples)


def test_huge_attempt_counts_do_not_overflow() -> None:
    backoff = Backoff(0.5, 30.0)
    backoff.attempt = 10_000
    assert 0 <= backoff.next_delay() <= 30.0


async def test_a_client_retries_a_dead_server_with_jittered_capped_delays() -> None:
    """Against a port nobody listens on, the stream keeps trying with jittered delays
    under a doubling ceiling that stops at the cap, and never raises."""
    notices: list[Notice] = []
    seen = asyncio.Event()

    def record(notice: Notice) -> None:
        notices.append(notice)
        if sum(n.kind == "disconnected" for n in notices) >= 12:
            seen.set()

    url = f"http://127.0.0.1:{free_port()}"
    async with PulseClient(
        url, "not-a-real-token", backoff_base_s=0.005, backoff_cap_s=0.04, on_notice=record
    ) as client:
        stream = client.sse()

        async def consume() -> None:
            async for _ in stream:
                pass

        task = asyncio.create_task(consume())
        await asyncio.wait_for(seen.wait(), 20)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    delays = [n.retry_in_s for n in notices if n.kind == "disconnected"]
    assert all(d is not None and 0 <= d <= 0.04 for d in delays)
    assert len(set(delays)) == len(delays)  # jittered: no two alike
    ceilings = [min(0.04, 0.005 * 2**i) for i in range(len(delays))]
    assert all(d <= c for d, c in zip(delays, ceilings, strict=True))


def test_a_retry_after_is_waited_with_jitter_on_top() -> None:
    """On a 429 or a close 4029 the client and `pulse tail` retried at exactly the
    Retry-After (5 s): clients refused together came back together, in lockstep at
    +5.0 s. Now never sooner, and up to half again later."""
    rng = random.Random(3)
    delays = [Backoff(0.5, 30.0, rng=rng).after(5.0) for _ in range(200)]
    assert all(5.0 <= d <= 7.5 for d in delays)
    assert min(delays) < 5.2 and max(delays) > 7.3
    backoff = Backoff(0.5, 30.0, rng=rng)
    backoff.attempt = 10  # a ceiling of 30 s: the backoff's delay when it is the longer
    assert all(d <= 30.0 for d in (backoff.after(5.0) for _ in range(50)))


async def test_streams_refused_together_do_not_come_back_together() -> None:
    """The reconnect loop itself: ten streams refused with the same Retry-After say ten
    different delays, none below it."""

    class Refused(ReconnectingStream[int]):
        async def _session(self, token: str) -> AsyncIterator[int]:
            raise Reconnect("429 connection_limit", min_delay_s=5.0)
            yield 0

    notices: list[Notice] = []
    for _ in range(10):
        stream = Refused(Credentials("token", None), Backoff())

        def told(notice: Notice, stream: Refused = stream) -> None:
            notices.append(notice)
            stream.stop()  # one refusal is enough: the stream ends instead of waiting

        stream.on_notice = told
        async for _ in stream:
            pass
    delays = [n.retry_in_s for n in notices]
    assert len(set(delays)) == 10 and all(d is not None and d >= 5.0 for d in delays), delays
