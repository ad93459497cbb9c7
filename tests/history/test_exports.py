"""Slots: how many exports stream at once, and every way a slot is given back."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import pytest

from pulse.errors import EXPORT_LIMIT, ApiError
from pulse.history.exports import Slots


async def lines(n: int, closed: list[str] | None = None) -> AsyncIterator[bytes]:
    try:
        for i in range(n):
            yield b"%d\n" % i
    finally:
        if closed is not None:
            closed.append("closed")


def refused(slots: Slots, tenant: str) -> ApiError:
    with pytest.raises(ApiError) as caught:
        slots.stream(tenant, lines(1))
    assert caught.value.error is EXPORT_LIMIT
    assert caught.value.headers["Retry-After"] == "5"
    return caught.value


async def test_a_tenant_and_the_process_each_have_a_limit() -> None:
    slots = Slots(per_process=2, per_tenant=1)
    first = slots.stream("t1", lines(3))
    assert "tenant streams 1 export" in str(refused(slots, "t1"))
    second = slots.stream("t2", lines(3))
    assert "This server streams" in str(refused(slots, "t3"))
    assert slots.held == 2
    assert [line async for line in first] == [b"0\n", b"1\n", b"2\n"]  # read to the end
    assert slots.held == 1
    third = slots.stream("t1", lines(1))  # t1's slot is free again
    await second.aclose()  # closed by the server: the client left
    await third.aclose()
    assert slots.held == 0


async def test_a_body_that_fails_gives_its_slot_back() -> None:
    slots = Slots(per_process=1, per_tenant=1)

    async def failing() -> AsyncIterator[bytes]:
        yield b"head\n"
        raise RuntimeError("the database went away")

    body = slots.stream("t1", failing())
    assert await anext(body) == b"head\n"
    with pytest.raises(RuntimeError):
        await anext(body)
    assert slots.held == 0


async def test_a_body_never_sent_gives_its_slot_back_when_dropped() -> None:
    slots = Slots(per_process=1, per_tenant=1)
    body = slots.stream("t1", lines(3))
    del body  # the response was never sent: no aclose, no iteration
    gc.collect()
    assert slots.held == 0
    slots.stream("t1", lines(1))


async def test_closing_twice_gives_back_once() -> None:
    slots = Slots(per_process=2, per_tenant=2)
    closed: list[str] = []
    body = slots.stream("t1", lines(3, closed))
    other = slots.stream("t1", lines(3))
    assert await anext(body) == b"0\n"
    await body.aclose()
    await body.aclose()
    assert closed == ["closed"]
    assert slots.held == 1
    await other.aclose()
    assert slots.held == 0
