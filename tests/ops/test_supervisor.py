"""The Supervisor: side tasks restarted when they die, stopped newest first."""

from __future__ import annotations

import asyncio

import pytest

from pulse.ops.supervisor import Supervisor


async def test_a_task_that_dies_or_returns_is_started_again() -> None:
    runs: list[str] = []
    third_run = asyncio.Event()

    async def flaky() -> None:
        runs.append("run")
        if len(runs) == 1:
            raise RuntimeError("first run fails")
        if len(runs) == 3:
            third_run.set()
            await asyncio.Event().wait()
        # the second run returns: also restarted

    supervisor = Supervisor(max_backoff_s=0.01)
    supervisor.start("flaky", flaky)
    await asyncio.wait_for(third_run.wait(), 5)
    assert supervisor.restarts == {"flaky": 2}
    assert supervisor.running() == {"flaky": True}
    await supervisor.stop()
    assert supervisor.running() == {}


async def test_stop_cancels_newest_first_and_waits_for_each() -> None:
    order: list[str] = []

    def forever(name: str) -> object:
        async def run() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0)  # cleanup that takes a turn of the loop
                order.append(name)

        return run

    supervisor = Supervisor()
    for name in ("listener", "leases", "sweeper"):
        supervisor.start(name, forever(name))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    await supervisor.stop()
    assert order == ["sweeper", "leases", "listener"]


async def test_a_name_runs_once() -> None:
    supervisor = Supervisor()
    supervisor.start("x", asyncio.Event().wait)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already running"):
        supervisor.start("x", asyncio.Event().wait)  # type: ignore[arg-type]
    await supervisor.stop()
