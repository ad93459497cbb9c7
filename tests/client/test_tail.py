"""`pulse tail` against a real server: filters, the table, JSON lines, a minted token."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable

import asyncpg
import orjson
import pytest

from tests.support import TEST_SECRET, insert_readings

pytestmark = pytest.mark.timeout(60)


async def pulse_tail(*args: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pulse",
        "tail",
        *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode().splitlines(), err.decode()


async def test_tail_prints_a_filtered_table(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await insert_readings(
        pool,
        "t1",
        [("d1", {"temp": 21.5, "hum": 40}), ("d2", {"temp": 22.0}), ("d1", {"hum": 41, "x": 1})],
    )
    lines, _ = await pulse_tail(
        "--url", server, "--token", make_token(), "--from-id", "0",
        "--device", "d1", "--metric", "temp", "--metric", "hum",
        "--format", "table", "--count", "2",
    )  # fmt: skip
    assert [line.split() for line in lines] == [
        ["ID", "TIME", "DEVICE", "hum", "temp"],
        ["1", lines[1].split()[1], "d1", "40", "21.5"],
        ["3", lines[2].split()[1], "d1", "41", "-"],
    ]


async def test_tail_mints_its_own_token_and_prints_json_lines(
    server: str, pool: asyncpg.Pool
) -> None:
    ids = await insert_readings(pool, "t1", [("d1", {"temp": 20.0}), ("d2", {"temp": 21.0})])
    for transport in ("sse", "ws"):
        lines, err = await pulse_tail(
            "--url", server, "--tenant", "t1", "--from-id", "0",
            "--transport", transport, "--count", "2",
            env={"PULSE_JWT_SECRET": TEST_SECRET},
        )  # fmt: skip
        events = [orjson.loads(line) for line in lines]
        assert [(e["type"], e["id"], e["device_id"]) for e in events] == [
            ("telemetry", ids[0], "d1"),
            ("telemetry", ids[1], "d2"),
        ]
        assert events[0]["data"]["metrics"] == {"temp": 20.0}
        assert events[0]["data"]["time"].endswith("Z")
        assert "# connected" in err


async def test_tail_reports_a_refused_token(server: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pulse", "tail", "--url", server, "--token", "nope",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and b"401" in err
