"""The Supervisor: side tasks restarted when they die, stopped newest first."""

from __future__ import annotations

import asyncio

import pytest

from pulse.ops import supervisor as supervisor_module
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


async def test_a_task_that_dies_alike_again_and_again_is_traced_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """From the operations review of 8 December: the rollups task, its SELECT revoked,
    died at every try, and each try logged a 28-line traceback (every 30 s for ever),
    where docs/operations.md promises such an error's traceback once, then a line."""
    tries = 0
    fifth = asyncio.Event()

    async def failing() -> None:
        nonlocal tries
        tries += 1
        if tries == 5:
            fifth.set()
        raise PermissionError("permission denied for table telemetry")

    supervisor = Supervisor(max_backoff_s=0.01)
    supervisor.start("rollups", failing)
    await asyncio.wait_for(fifth.wait(), 5)
    await supervisor.stop()
    died = [r for r in caplog.records if "task rollups died" in r.getMessage()]
    assert died and died[0].exc_info is not None, died
    assert not [r for r in died[1:] if r.exc_info], "a traceback after the first"


async def test_the_same_error_after_a_healthy_run_is_traced_again(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review 4 of 8 December: once traced, an error came back after hours of health as
    one "(again)" line for the life of the process, its traceback long gone from the
    logs. A task that ran HEALTHY_S before it died begins a new streak."""
    monkeypatch.setattr(supervisor_module, "HEALTHY_S", 0.2)
    tries = 0
    third = asyncio.Event()

    async def failing() -> None:
        nonlocal tries
        tries += 1
        if tries == 2:
            await asyncio.sleep(0.3)  # healthy for longer than HEALTHY_S, then the same
        if tries == 3:
            third.set()
            await asyncio.Event().wait()
        raise PermissionError("permission denied for table telemetry")

    supervisor = Supervisor(max_backoff_s=0.01)
    supervisor.start("rollups", failing)
    await asyncio.wait_for(third.wait(), 5)
    await supervisor.stop()
    died = [r for r in caplog.records if "task rollups died" in r.getMessage()]
    assert [r.exc_info is not None for r in died] == [True, True], died
