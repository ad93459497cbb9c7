"""`pulse tail` against a real server: filters, the table, JSON lines, a minted token,
a closed stdout, and giving up on a first connection that cannot be made."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import orjson
import pytest

from pulse.cli import build_parser
from pulse.client.events import Telemetry
from pulse.client.tail import TableFormatter
from tests.client.restartable import restartable_server
from tests.client.tailproc import pulse_tail
from tests.support import TEST_SECRET, free_port, insert_readings

pytestmark = pytest.mark.timeout(60)


async def run_tail(*args: str, env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Run `pulse tail` to its end (give it --count); its stdout lines and its stderr."""
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


async def test_tail_prints_a_filtered_table_with_the_metrics_in_the_order_asked(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await insert_readings(
        pool,
        "t1",
        [("d1", {"temp": 21.5, "hum": 40}), ("d2", {"temp": 22.0}), ("d1", {"hum": 41, "x": 1})],
    )
    lines, _ = await run_tail(
        "--url", server, "--token", make_token(), "--from-id", "0",
        "--device", "d1", "--metric", "temp", "--metric", "hum",
        "--format", "table", "--count", "2",
    )  # fmt: skip
    assert [line.split() for line in lines] == [
        ["ID", "TIME", "DEVICE", "temp", "hum"],
        ["1", lines[1].split()[1], "d1", "21.5", "40"],
        ["3", lines[2].split()[1], "d1", "-", "41"],
    ]


async def test_tail_reads_the_server_and_token_from_the_environment(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """PULSE_URL and PULSE_TOKEN, as the demo prints them and the docs' examples read
    them: no --url, no --token."""
    await insert_readings(pool, "t1", [("d1", {"temp": 21.5})])
    lines, _ = await run_tail(
        "--from-id", "0", "--count", "1", env={"PULSE_URL": server, "PULSE_TOKEN": make_token()}
    )
    assert [orjson.loads(line)["data"]["metrics"] for line in lines] == [{"temp": 21.5}]


async def test_tail_table_columns_line_up_with_long_device_ids_and_metric_names(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    long_id = "greenhouse-north-sensor-0042"  # wider than the default 16
    metric = "soil_moisture_percent"  # wider than the default 12
    await insert_readings(
        pool,
        "t1",
        [("d1", {"temp": 21.5, metric: 40}), (long_id, {"temp": 1234.5}), ("d1", {metric: 7})],
    )
    lines, _ = await run_tail(
        "--url", server, "--token", make_token(), "--from-id", "0", "--format", "table",
        "--device", f"d1,{long_id}", "--metric", f"{metric},temp", "--count", "3",
    )  # fmt: skip
    header, *rows = lines
    assert header.split() == ["ID", "TIME", "DEVICE", metric, "temp"]
    # Numbers are right-aligned under their header: the cells end where the names end.
    ends = {name: header.index(name) + len(name) for name in (metric, "temp")}
    assert {len(line) for line in lines} == {ends["temp"]}
    cells = [(row[: ends[metric]].split()[-1], row[ends[metric] :].strip()) for row in rows]
    assert cells == [("40", "21.5"), ("-", "1234.5"), ("7", "-")]
    assert [row.split()[2] for row in rows] == ["d1", long_id, "d1"]
    assert len({row.index(row.split()[2]) for row in rows}) == 1  # DEVICE starts alike


def test_a_value_wider_than_its_column_widens_it_from_that_row_on() -> None:
    """The table is printed as events come, so a column cannot know its widest value in
    advance: the rows before a wide value keep the old width, the rows after follow."""
    time_ = datetime(2026, 1, 1, tzinfo=UTC)
    table = TableFormatter(["temp"])
    long_id = "x" * 30
    lines = "".join(
        table.row(Telemetry(i, device, time_, {"temp": 20.0}))
        for i, device in enumerate(["d1", long_id, "d2", "d3"], start=1)
    ).splitlines()
    header, first, wide, *after = lines
    assert len(header) == len(first)
    assert len(wide) == len(first) + len(long_id) - 16
    assert {len(line) for line in after} == {len(wide)}
    assert {line.index("20") for line in [wide, *after]} == {wide.index("20")}


async def test_tail_mints_its_own_token_and_prints_json_lines(
    server: str, pool: asyncpg.Pool
) -> None:
    ids = await insert_readings(pool, "t1", [("d1", {"temp": 20.0}), ("d2", {"temp": 21.0})])
    for transport in ("sse", "ws"):
        lines, err = await run_tail(
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


async def test_tail_into_head_ends_quietly_once_head_is_done(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """`pulse tail | head -3`: the next write after head exits finds the pipe closed."""
    await insert_readings(pool, "t1", [("d1", {"n": i}) for i in range(5)])
    tail = [sys.executable, "-m", "pulse", "tail", "--url", server, "--token", make_token()]
    command = f"set -o pipefail; {shlex.join([*tail, '--from-id', '0'])} | head -3"
    shell = await asyncio.create_subprocess_exec(
        "bash", "-c", command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        assert shell.stdout is not None
        head = [await asyncio.wait_for(shell.stdout.readline(), 30) for _ in range(3)]
        assert [orjson.loads(line)["data"]["metrics"] for line in head] == [
            {"n": 0},
            {"n": 1},
            {"n": 2},
        ]
        deadline = time.monotonic() + 30
        while shell.returncode is None and time.monotonic() < deadline:
            await insert_readings(pool, "t1", [("d1", {"n": -1})])  # something to write
            try:
                await asyncio.wait_for(shell.wait(), 0.2)
            except TimeoutError:
                continue
    finally:
        if shell.returncode is None:
            shell.kill()
            await shell.wait()
    assert shell.stderr is not None
    stderr = (await shell.stderr.read()).decode()
    assert shell.returncode == 0, stderr  # pipefail: tail's own status
    assert all(line.startswith("# ") for line in stderr.splitlines()), stderr


@pytest.mark.parametrize("transport", ["sse", "ws"])
async def test_tail_gives_up_when_the_first_connection_cannot_be_made(
    make_token: Callable[..., str], transport: str
) -> None:
    """A wrong --url: nothing listens there. The bound is 2 s here; the default's
    value (10 s) is the parser's (test_the_connect_timeout_defaults_to_ten_seconds)."""
    url = f"http://127.0.0.1:{free_port()}"
    args = ("--url", url, "--token", make_token(), "--transport", transport)
    async with pulse_tail(*args, "--connect-timeout", "2") as tail:
        status = await tail.exit_status(within=30)
    *notices, last = tail.stderr.splitlines()
    assert status == 1, tail.stderr
    assert re.fullmatch(
        rf"pulse tail: no connection to {url} within 2 s: cannot connect \(.+\)", last
    ), last
    assert notices and all(line.startswith("# disconnected: cannot connect") for line in notices)


def test_the_connect_timeout_defaults_to_ten_seconds() -> None:
    """The bound a wrong --url waits without --connect-timeout; 0 waits for ever."""
    parse = build_parser().parse_args
    assert parse(["tail"]).connect_timeout == 10
    assert parse(["tail", "--connect-timeout", "0"]).connect_timeout == 0


async def test_tail_gives_up_on_a_server_that_never_answers(
    make_token: Callable[..., str],
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    listener = await asyncio.start_server(hold, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        args = ("--url", url, "--token", make_token(), "--connect-timeout", "1")
        async with pulse_tail(*args) as tail:
            status = await tail.exit_status(within=20)
    finally:
        for writer in held:
            writer.close()
        listener.close()
    assert status == 1 and held, tail.stderr
    assert tail.stderr == f"pulse tail: no connection to {url} within 1 s: no answer\n"


@pytest.mark.timeout(120)
async def test_tail_retries_for_ever_once_it_has_connected(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    """The bound is for the first connection only: a server that goes away for longer
    is waited for, and tail resumes where it stopped."""
    await insert_readings(pool, "t1", [("d1", {"n": 1})])
    async with restartable_server(database_url, tmp_path) as server:
        args = ("--url", server.url, "--token", make_token(), "--from-id", "0")
        # A bound the first connection meets on a busy machine too (a process starting
        # beside two CPU-bound ones took more than 1 s; beside a whole suite and three
        # other servers' load, more than 5), then retries for longer.
        async with pulse_tail(*args, "--connect-timeout", "10") as tail:
            await tail.wait_for(lambda: len(tail.lines) == 1, "the first event")
            await server.kill()

            def waited_s() -> float:
                return sum(map(float, re.findall(r"retrying in ([0-9.]+) s", tail.stderr)))

            await tail.wait_for(lambda: waited_s() > 11, "retries for longer than the bound", 90)
            await insert_readings(pool, "t1", [("d1", {"n": 2})])
            await server.start()
            await tail.wait_for(lambda: len(tail.lines) == 2, "the event written while down")
            assert await tail.stop() == 0
    assert [orjson.loads(line)["data"]["metrics"]["n"] for line in tail.lines] == [1, 2]
    assert tail.stderr.count("# connected") == 2
