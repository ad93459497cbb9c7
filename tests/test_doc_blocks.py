"""Every code block of the README and docs/ is what it says it is, and runs as written.

Each fenced block names its language. Python blocks are complete scripts and shell blocks
are valid bash; the ones a reader runs against a server (the README's client script and
`pulse serve`, the protocol's reconnecting clients, the ingest `curl` commands, `pulse
tail`) run here against a real server, each until it prints what the doc says it prints.
docs/client.md's Python examples run in tests/client/test_docs.py; the few shell blocks
that are not run here say where they are (SYNTAX_ONLY). JSON blocks parse; JavaScript
blocks are checked by `node --check` (they are browser code: EventSource, WebSocket).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.support import TEST_SECRET, provision_device, run_until

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"python", "sh", "json", "js", "text", "http", "mermaid", "sql"}


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repo
    line: int
    language: str
    code: str

    @property
    def key(self) -> tuple[str, str]:
        """The page and the block's first line: how the tables below name a block."""
        return self.page, self.code.splitlines()[0]


def blocks() -> list[Block]:
    found = []
    fence = re.compile(r"^( *)```(\S*)\n(.*?)^\1```$", re.MULTILINE | re.DOTALL)
    for page in PAGES:
        text = page.read_text()
        for match in fence.finditer(text):
            indent = len(match[1])
            code = "".join(line[indent:] for line in match[3].splitlines(keepends=True))
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(str(page.relative_to(ROOT)), line, match[2], code))
    return found


def of(language: str, page: str | None = None) -> list[Block]:
    return [b for b in blocks() if b.language == language and page in (None, b.page)]


# Shell blocks checked for syntax only, each named by its page and a word only it has,
# and where they run instead.
SYNTAX_ONLY = {
    ("README.md", "pulse demo"): "tests/demo/test_readme.py runs it in a fresh environment",
    ("README.md", "python -m pytest"): "the test command itself",
    ("docs/performance.md", "benchmarks all"): ".ci/run runs the benchmarks as a smoke test",
    ("docs/operations.md", "test_soak.py"): "the suite runs tests/test_soak.py in its short form",
    ("README.md", "mosquitto_pub"): "tests/mqtt/test_readme.py runs it against a Mosquitto",
    ("docs/ingest.md", "mosquitto_pub"): "the README's line, to a local broker, is run",
    ("docs/ingest.md", "PULSE_MQTT_URL"): "tests/mqtt start Pulse with such a URL",
}
# Shell blocks run here, named the same way.
RUN_HERE = {
    ("README.md", "pulse serve"),
    ("README.md", "pulse token --tenant acme"),
    ("docs/fleet.md", "rotate-token"),
    ("docs/ingest.md", 'curl -sS -X POST "$PULSE_URL/ingest/v1/tenant'),
    ("docs/ingest.md", "/heartbeat"),
    ("docs/ingest.md", "/ingest/v1/batch"),
    ("docs/client.md", "pulse tail"),
}


def test_every_block_names_its_language() -> None:
    unnamed = [f"{b.page}:{b.line}" for b in blocks() if b.language not in LANGUAGES]
    assert not unnamed, f"blocks with no or an unknown language: {unnamed}"


@pytest.mark.parametrize("block", of("python"), ids=lambda b: f"{b.page}:{b.line}")
def test_python_blocks_are_complete_scripts(block: Block) -> None:
    compile(block.code, f"{block.page}:{block.line}", "exec")
    assert re.search(r"^\s*asyncio\.run\(", block.code, re.MULTILINE), "a script that runs"


@pytest.mark.parametrize("block", of("sh"), ids=lambda b: f"{b.page}:{b.line}")
def test_shell_blocks_are_valid_bash(block: Block) -> None:
    import subprocess

    checked = subprocess.run(["bash", "-n"], input=block.code, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr
    assert "..." not in block.code.replace("# ", ""), "a placeholder the reader cannot run"


@pytest.mark.parametrize("block", of("json"), ids=lambda b: f"{b.page}:{b.line}")
def test_json_blocks_parse(block: Block) -> None:
    json.loads(block.code)


@pytest.mark.parametrize("block", of("js"), ids=lambda b: f"{b.page}:{b.line}")
def test_javascript_blocks_parse(block: Block, tmp_path: Path) -> None:
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: JavaScript blocks are checked by `node --check`")
    script = tmp_path / "example.mjs"  # top-level await and the like, as in a module
    script.write_text(block.code)
    checked = subprocess.run([node, "--check", str(script)], text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


# --- the blocks that run -------------------------------------------------------------

# Python scripts, each named by its page and a word only it has, and what it prints once
# it works (a pattern that starts a line).
PYTHON_PRINTS: dict[tuple[str, str], str | list[str]] = {
    ("README.md", "PulseClient"): r"\d+ dev-000[12] [\d.]+$",
    ("docs/protocol.md", "httpx"): r"\{'type': 'telemetry', 'id': \d+, 'device_id': 'dev-000[12]'",
    ("docs/protocol.md", "websockets"): r"dev-000[12] \{'temp': [\d.]+",
    ("docs/history.md", "fleet_history"): [
        r"\d{4}-\d\d-\d\dT\S+ 21\.5 \d+$",  # the week's last buckets
        r"\d+ \S+ \{'temp': 21\.5, 'humidity': 40\}$",  # readings
        r"devices: dev-0001, dev-0002$",
        r"\d+,\S+,temp,21\.5",  # the export's rows
    ],
}


# Those whose page says Ctrl-C stops them: it must, quietly.
STOPPED_WITH_CTRL_C = {("README.md", "PulseClient")}


def python_block(page: str, word: str) -> Block:
    [block] = [b for b in of("python", page) if word in b.code]
    return block


def test_every_python_block_is_run() -> None:
    """Every Python block outside docs/client.md (tests/client/test_docs.py runs those)."""
    run_here = [python_block(page, word) for page, word in PYTHON_PRINTS]
    assert sorted(run_here, key=str) == sorted(
        (b for b in of("python") if b.page != "docs/client.md"), key=str
    )


@pytest.fixture
async def readings(server: str, pool: asyncpg.Pool) -> AsyncIterator[dict[str, str]]:
    """dev-0001 and dev-0002 of the tenants acme and demo report every 0.1 s; yields the
    provision tokens by "tenant/device"."""
    tokens = {
        f"{tenant}/{device}": await provision_device(pool, tenant, device)
        for tenant in ("acme", "demo")
        for device in ("dev-0001", "dev-0002")
    }
    messages = [
        {
            "tenant_id": key.split("/")[0],
            "device_id": key.split("/")[1],
            "provision_token": token,
            "metrics": {"temp": 21.5, "humidity": 40},
        }
        for key, token in tokens.items()
    ]
    reported = asyncio.Event()
    async with httpx.AsyncClient(base_url=server) as http:

        async def report() -> None:
            while True:
                r = await http.post("/ingest/v1/batch", json={"messages": messages})
                assert r.json()["accepted"] == len(messages), r.text
                reported.set()
                await asyncio.sleep(0.1)  # the devices' pace, not a wait for something

        reporting = asyncio.create_task(report())
        try:
            await asyncio.wait_for(reported.wait(), 10)
            yield tokens
        finally:
            reporting.cancel()
            [outcome] = await asyncio.gather(reporting, return_exceptions=True)
            if not isinstance(outcome, asyncio.CancelledError):
                raise AssertionError(f"the devices stopped reporting: {outcome!r}")


def environment(server: str, token: str, **more: str) -> dict[str, str]:
    venv_bin = str(Path(sys.executable).parent)  # `pulse` as with the environment active
    return {
        **os.environ,
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
        "PULSE_URL": server,
        "PULSE_TOKEN": token,
        "PULSE_JWT_SECRET": TEST_SECRET,
        "PYTHONUNBUFFERED": "1",  # each line as it is printed, as in a terminal
        **more,
    }


@pytest.mark.parametrize("key", list(PYTHON_PRINTS), ids="-".join)
async def test_python_block_runs_as_written(
    server: str,
    readings: dict[str, str],
    make_token: Callable[..., str],
    tmp_path: Path,
    key: tuple[str, str],
) -> None:
    script = tmp_path / "example.py"
    script.write_text(python_block(*key).code)
    env = environment(server, make_token(tenant_id="acme"))
    printed = PYTHON_PRINTS[key]
    await run_until(
        [sys.executable, str(script)],
        env,
        printed if isinstance(printed, list) else [printed],
        interrupt=key in STOPPED_WITH_CTRL_C,
    )


async def test_the_protocol_websocket_follower_stops_at_a_refused_token(
    server: str, make_token: Callable[..., str], tmp_path: Path
) -> None:
    """docs/protocol.md's Python WebSocket follower took only 4000 and 4003 as final: with
    an expired token it reconnected for ever, each try closed 4001 token_expired (the
    audit's ran until killed). It has no way to a new token, so a 4001 ends it."""
    script = tmp_path / "example.py"
    script.write_text(python_block("docs/protocol.md", "websockets").code)
    env = environment(server, make_token(tenant_id="acme", lifetime_s=-120))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(30):
            output, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode != 0
    assert "4001" in output.decode() and "token_expired" in output.decode(), output.decode()


def shell_block(page: str, word: str) -> Block:
    [block] = [b for b in of("sh", page) if word in b.code]
    return block


def test_every_shell_block_is_run_or_said_where() -> None:
    named = [shell_block(page, word) for page, word in [*SYNTAX_ONLY, *RUN_HERE]]
    assert sorted(named, key=str) == sorted(of("sh"), key=str)


async def test_ingest_curl_blocks_run_as_written(
    server: str, readings: dict[str, str], tmp_path: Path, make_token: Callable[..., str]
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the ingest examples are curl commands")
    env = environment(
        server, make_token(tenant_id="acme"), PULSE_DEVICE_TOKEN=readings["acme/dev-0001"]
    )
    telemetry, heartbeat, batch = (
        shell_block("docs/ingest.md", word).code
        for word in ('curl -sS -X POST "$PULSE_URL/ingest/v1/tenant', "/heartbeat", "/batch")
    )
    for block in (telemetry, heartbeat):
        # The answer the block shows in its last comment, with any id.
        shown = re.escape(block.strip().splitlines()[-1].removeprefix("# "))
        proc = await asyncio.create_subprocess_exec(
            "bash", "-c", block, env=env, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        assert re.fullmatch(re.sub(r"\d+", r"\\d+", shown), out.decode().strip()), out

    # The batch request above the command, saved as backlog.json with its devices' tokens.
    request, answer = (json.loads(b.code) for b in of("json", "docs/ingest.md")[1:3])
    for message in request["messages"]:
        message["provision_token"] = readings[f"{message['tenant_id']}/{message['device_id']}"]
    (tmp_path / "backlog.json").write_text(json.dumps(request))
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", batch, env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0
    got = json.loads(out)
    for result in got["results"]:
        result.pop("id", None)
    for result in answer["results"]:
        result.pop("id", None)
    assert got == answer


@pytest.mark.parametrize("line", range(4))
async def test_pulse_tail_block_runs_as_written(
    server: str, readings: dict[str, str], make_token: Callable[..., str], line: int
) -> None:
    command = shell_block("docs/client.md", "pulse tail").code.splitlines()[line]
    env = environment(server, make_token(tenant_id="demo"))
    patterns = {0: r"\{", 1: r".*dev-000[12]", 2: r"\{", 3: r"\{"}
    await run_until(["bash", "-c", command], env, [patterns[line]])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_fleet_shell_block_runs_as_written(
    server: str, make_token: Callable[..., str]
) -> None:
    block = shell_block("docs/fleet.md", "rotate-token").code
    env = environment(server, make_token(tenant_id="acme", roles=("tenant-admin",)))
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", block, env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    created, read, rotated, rule, alerts = out.decode().splitlines()  # the delete: nothing
    created_device = json.loads(created)
    assert created_device["name"] == "Boiler 42" and created_device["provision_token"]
    assert json.loads(read)["device_id"] == "dev-0042" and "provision_token" not in read
    assert json.loads(rotated)["provision_token"] not in ("", created_device["provision_token"])
    assert json.loads(rule)["threshold"] == 80.0
    assert json.loads(alerts) == {"alerts": [], "next_cursor": None}
    async with httpx.AsyncClient(base_url=server) as http:
        gone = await http.get(
            "/api/v1/customer/devices/dev-0042",
            headers={"Authorization": f"Bearer {env['PULSE_TOKEN']}"},
        )
    assert gone.status_code == 404


async def test_readme_first_device_block_runs_as_written(server: str) -> None:
    if not (ROOT / ".venv" / "bin" / "pulse").exists():
        pytest.skip("no .venv at the repo's root (the README's test line makes it)")
    block = shell_block("README.md", "pulse token --tenant acme").code
    env = {**os.environ, "PORT": server.rsplit(":", 1)[1], "PULSE_JWT_SECRET": TEST_SECRET}
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", block, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    device = json.loads(out)
    assert device["device_id"] == "dev-0001" and device["provision_token"], device


async def test_readme_serve_block_runs_as_written(database_url: str, tmp_path: Path) -> None:
    if not (ROOT / ".venv" / "bin" / "pulse").exists():
        pytest.skip("no .venv at the repo's root (the README's test line makes it)")
    block = shell_block("README.md", "pulse serve").code
    port = free_port()
    env = {**os.environ, "PORT": str(port), "DATABASE_URL": database_url}
    env.pop("PULSE_JWT_SECRET", None)
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        block,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:

            async def ready() -> bool:
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            for _ in range(600):
                if await ready() or proc.returncode is not None:
                    break
                await asyncio.sleep(0.1)
            assert proc.returncode is None and await ready(), "it serves"
    finally:
        if proc.returncode is None:  # SIGTERM to all of it, as a platform stops a dyno
            os.killpg(proc.pid, signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    # bash runs its last command in its own place, so its status is the server's.
    assert proc.returncode == 0, out.decode()


async def test_the_rollups_repair_block_recounts_one_minute_as_the_keeper_did(
    database_url: str, tmp_path: Path
) -> None:
    """docs/operations.md's repair of the 1-minute rollups of the minute migration 0009
    ran in (the upgrade audit: about one keeper pass of them lost), run with psql as
    written: the minute's buckets are the keeper's own again, and the readings the keeper
    has not counted yet are left to it; and the query that finds such minutes finds the
    damaged one's quarter before, nothing after."""
    from datetime import UTC, datetime, timedelta

    from pulse.db.queries import load_queries

    if shutil.which("psql") is None:
        pytest.skip("no psql")
    [check, block] = sorted(of("sql", "docs/operations.md"), key=lambda b: "BEGIN;" in b.code)
    assert "HAVING" in check.code  # the query that finds the minutes to repair
    (tmp_path / "repair.sql").write_text(block.code)
    minute = datetime(2026, 12, 6, 10, 41, tzinfo=UTC)
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO tenants (tenant_id) VALUES ('t1'), ('t2')")
        rows = [
            (
                tenant,
                i,
                f"d{i % 3}",
                minute + timedelta(seconds=(i * 7.3) % 150 - 50),
                json.dumps({"temp": (i * 13) % 50 + 0.5, "on": "true" if i % 2 else "false"}),
            )
            for tenant in ("t1", "t2")
            for i in range(1, 201)
        ]
        await conn.executemany(
            "INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)"
            " VALUES ($1, $2, $3, $4, $5::jsonb)",
            rows,
        )
        roll_up = load_queries("pulse.history")["roll_up"]
        for tenant in ("t1", "t2"):  # the keeper counted up to 150; 151-200 are its next pass
            await conn.execute(roll_up, tenant, 0, 150)
            await conn.execute(
                "INSERT INTO rollup_watermarks (tenant_id, last_id) VALUES ($1, 150)", tenant
            )
        query = (
            "SELECT tenant_id, device_id, metric, count, min, max, round(sum::numeric, 6),"
            " last, last_time, last_id FROM telemetry_rollups WHERE width = 1 AND bucket = $1"
            " ORDER BY 1, 2, 3"
        )
        kept = await conn.fetch(query, minute)
        assert kept
        await conn.execute(  # what 0009's race left: counts lost, a bucket gone
            "UPDATE telemetry_rollups SET count = count - 3 WHERE width = 1 AND bucket = $1;",
            minute,
        )
        await conn.execute(
            "DELETE FROM telemetry_rollups WHERE width = 1 AND bucket = $1 AND device_id = 'd0'",
            minute,
        )
        # A device whose readings of the minute retention has dropped: its rollups are
        # all that is left of them, and the repair keeps them (it deleted them).
        gone = (
            "INSERT INTO telemetry_rollups (tenant_id, device_id, width, bucket, metric, count,"
            " min, max, sum, last, last_time, last_id)"
            " VALUES ('t1', 'gone', 1, $1, 'temp', 5, 1, 9, 25, 9, $1, 7)"
        )
        await conn.execute(gone, minute)
        quarter = minute.replace(minute=30)
        assert {r["quarter"] for r in await conn.fetch(check.code)} == {quarter}
        proc = await asyncio.create_subprocess_exec(
            "psql",
            database_url,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"m={minute.isoformat()}",
            "-f",
            str(tmp_path / "repair.sql"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        after = await conn.fetch(query, minute)
        assert [r for r in after if r["device_id"] != "gone"] == kept
        assert [(r["count"], r["last_id"]) for r in after if r["device_id"] == "gone"] == [(5, 7)]
        assert await conn.fetch(check.code) == []  # nothing left to repair
    finally:
        await conn.close()
