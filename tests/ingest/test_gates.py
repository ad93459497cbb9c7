from __future__ import annotations

import asyncio

from pulse.ingest.gates import KeyedLocks


async def test_same_key_waits_other_key_does_not() -> None:
    gates = KeyedLocks()
    release = asyncio.Event()
    entered: list[str] = []

    async def hold(keys: list[str], name: str, wait: bool) -> None:
        async with gates.hold(keys):
            entered.append(name)
            if wait:
                await release.wait()

    first = asyncio.create_task(hold(["a"], "first", True))
    await asyncio.sleep(0)
    same = asyncio.create_task(hold(["a"], "same", False))
    other = asyncio.create_task(hold(["b"], "other", False))
    await asyncio.wait_for(other, 1)
    assert entered == ["first", "other"]
    release.set()
    await asyncio.wait_for(asyncio.gather(first, same), 1)
    assert entered == ["first", "other", "same"]
    assert len(gates) == 0


async def test_opposite_orders_do_not_deadlock() -> None:
    gates = KeyedLocks()

    async def hold(keys: list[str]) -> None:
        for _ in range(50):
            async with gates.hold(keys):
                await asyncio.sleep(0)

    await asyncio.wait_for(asyncio.gather(hold(["a", "b"]), hold(["b", "a"])), 5)
    assert len(gates) == 0


async def test_cancelled_waiter_leaves_nothing_behind() -> None:
    gates = KeyedLocks()
    release = asyncio.Event()

    async def hold() -> None:
        async with gates.hold(["a"]):
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()
    await holder
    assert len(gates) == 0
