"""`pulse serve` raises its limit of open files, and says when it is too few.

Every connection is a file; where none is left the event loop accepts a new
connection and closes it unanswered. Each case runs in a child process, whose
limits it may lower without touching the test run's.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support import start_serve

CHILD = """
import logging, resource, sys
from pulse.config import Settings
from pulse.serving import raise_open_files_limit
logging.basicConfig(level=logging.{level}, format="%(message)s")
soft, hard = {soft}, {hard}
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
limit = raise_open_files_limit(Settings(max_connections={max_connections}))
assert limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0], limit
print(limit)
"""


def _child(soft: int, hard: int, max_connections: int, level: str = "WARNING") -> tuple[int, str]:
    code = CHILD.format(soft=soft, hard=hard, max_connections=max_connections, level=level)
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout.strip()), done.stderr


@pytest.fixture
def hard_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip(f"the hard limit of open files here is {hard}, too low to lower from")
    return 4096 if hard == resource.RLIM_INFINITY else min(hard, 1 << 20)


def test_the_soft_limit_is_raised_to_the_hard_one(hard_limit: int) -> None:
    limit, said = _child(256, hard_limit, max_connections=10)
    assert limit == hard_limit
    assert said == ""


def test_too_few_files_for_the_connections_allowed_is_said(hard_limit: int) -> None:
    limit, said = _child(300, 300, max_connections=10_000)
    assert limit == 300
    assert "may open 300 files" in said
    assert "PULSE_MAX_CONNECTIONS=10000" in said
    assert "about 20200" in said


def test_too_few_files_only_for_a_storm_is_no_warning(hard_limit: int) -> None:
    """Enough for every connection allowed to be open, not for all of them coming back
    at once beside those ending: said at INFO, not warned at every start (a host with
    20,000 against 20,200 for the default 10,000 connections)."""
    limit, said = _child(1000, 1000, max_connections=450)  # 650 at once, 1100 in a storm
    assert (limit, said) == (1000, "")
    limit, said = _child(1000, 1000, max_connections=450, level="INFO")
    assert "may open 1000 files" in said and "about 1100" in said


def test_enough_files_says_nothing(hard_limit: int) -> None:
    limit, said = _child(1000, 1000, max_connections=400)
    assert (limit, said) == (1000, "")


SERVE_WITH_A_LOW_SOFT_LIMIT = """
import resource
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
from pulse.cli import main
main(["serve"])
"""


async def test_pulse_serve_runs_with_the_raised_limit_and_reports_it(
    database_url: str, hard_limit: int, tmp_path: Path
) -> None:
    server = await start_serve(
        data_dir=tmp_path, database_url=database_url, script=SERVE_WITH_A_LOW_SOFT_LIMIT
    )
    try:
        await server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            status = (await http.get("/api/v1/telemetry/stream/status")).json()
    finally:
        await server.stop()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    assert status["limits"]["max_open_files"] == raised


SERVE_WORKERS_WITH_TOO_FEW_FILES = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))
from pulse.cli import main
main(["serve", "--workers", "2"])
"""


async def test_too_few_files_is_said_once_with_workers(
    database_url: str, hard_limit: int, tmp_path: Path
) -> None:
    """From the operations audit: with --workers N the warning came N + 1 times, once
    from each worker beside the supervisor's own; the workers inherit its limit."""
    server = await start_serve(
        data_dir=tmp_path,
        database_url=database_url,
        env={"PULSE_MAX_CONNECTIONS": "10000"},
        script=SERVE_WORKERS_WITH_TOO_FEW_FILES,
    )
    try:
        await server.wait_ready()
    finally:
        await server.stop()
    assert server.stderr.decode().count("may open 400 files") == 1, server.stderr.decode()
