"""`pulse demo` in-process: it serves, provisions the fleet, prints what it promises, and stops."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pulse.client import PulseClient
from pulse.config import Settings
from pulse.sim.demo import DemoError, demo_settings, run_demo
from tests.support import free_port, run_until

pytestmark = pytest.mark.timeout(90)


def test_demo_settings_fill_only_what_the_environment_left_unset() -> None:
    defaults = demo_settings(Settings())
    assert (defaults.stale_after_s, defaults.offline_after_s) == (15.0, 60.0)
    assert defaults.jwt_secret is None and defaults.data_dir.name == "demo"  # DemoState
    mine = demo_settings(Settings(stale_after_s=5.0, jwt_secret="s" * 32, log_level="DEBUG"))
    assert (mine.stale_after_s, mine.jwt_secret, mine.log_level) == (5.0, "s" * 32, "DEBUG")


async def test_a_taken_port_is_reported_before_anything_starts(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DemoError, match=f"127.0.0.1:{port}.*--port"):
            await run_demo(settings, port=port, out=io.StringIO(), stop=asyncio.Event())


@pytest.mark.parametrize("where", ["a-file", "a-file/below", "/proc/no-such-folder"])
async def test_a_data_folder_that_cannot_be_used_is_one_line_naming_it(
    tmp_path: Path, where: str
) -> None:
    """From the first-ten-minutes audit: a file (or /proc) as PULSE_DATA_DIR was a
    NotADirectoryError traceback in `pulse demo`; `pulse serve` said it in one line."""
    (tmp_path / "a-file").write_text("not a folder")
    data_dir = tmp_path / where
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DATABASE"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "pulse", "demo", "--port", str(free_port())),
        env=env | {"PULSE_DATA_DIR": str(data_dir)},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    lines = stderr.decode().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"pulse demo: cannot keep its data in PULSE_DATA_DIR={data_dir}: ")
    assert lines[0].endswith(")") and f" ({data_dir}" in lines[0], lines  # what failed


async def test_a_database_not_migrated_is_one_line_and_leaves_no_broker_running(
    tmp_path: Path, empty_database: str
) -> None:
    """From the client review of 7 December: with a DATABASE_URL not migrated (or not
    reachable) `pulse demo` printed a traceback, and the Mosquitto it had started stayed
    running (its stop came after the server's error). And --port 70000 was a traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DATABASE"))}
    env |= {"PULSE_DATA_DIR": str(tmp_path), "DATABASE_URL": empty_database}
    code, said = await stderr_of(
        sys.executable, "-m", "pulse", "demo", "--port", str(free_port()), env=env
    )
    assert code == 1 and "Traceback" not in said, said
    assert said.splitlines()[-1].startswith("pulse demo: the database "), said
    assert "is not migrated" in said
    # Nothing of the demo's own is left running (its broker keeps its data in the folder).
    code, left = await stderr_of("pgrep", "-f", str(tmp_path), env=env, stdout=True)
    assert code == 1 and left == "", left  # pgrep: 1, none

    code, said = await stderr_of(sys.executable, "-m", "pulse", "demo", "--port", "70000", env=env)
    assert code == 2 and "Traceback" not in said, said
    assert "70000 is not a TCP port (1 to 65535)" in said


async def stderr_of(*command: str, env: dict[str, str], stdout: bool = False) -> tuple[int, str]:
    """A command's exit status and what it wrote to stderr (or to stdout)."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        env=env,
        stdout=asyncio.subprocess.PIPE if stdout else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL if stdout else asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, (out if stdout else err).decode()


async def test_demo_serves_a_provisioned_fleet_and_prints_working_examples(
    settings: Settings,
) -> None:
    out = io.StringIO()
    stop = asyncio.Event()
    port = free_port()
    demo = asyncio.create_task(run_demo(settings, port=port, seed=1, out=out, stop=stop))
    try:
        for _ in range(600):
            if "Press Ctrl-C" in out.getvalue() or demo.done():
                break
            await asyncio.sleep(0.05)
        text = out.getvalue()
        assert "Press Ctrl-C" in text, text
        base = f"http://127.0.0.1:{port}"
        token = re.search(r"Dashboard:\s+" + re.escape(base) + r"/#token=(\S+)", text)
        assert token, text
        assert f"export PULSE_TOKEN={token[1]}" in text
        headers = {"Authorization": f"Bearer {token[1]}"}

        async with httpx.AsyncClient(base_url=base, headers=headers) as http:
            page = await http.get("/")
            assert page.status_code == 200 and "Pulse" in page.text
            devices = (await http.get("/api/v1/customer/devices")).json()["devices"]
            assert len(devices) == 25
            rules = (await http.get("/api/v1/customer/alert-rules")).json()["rules"]
            assert len(rules) == 2

            # The printed curl ingest command works as printed.
            curl = re.search(r"  (curl -X POST .*?\}'\n)", text, re.S)
            assert curl, text
            command = curl[1].replace("\\\n", " ")
            result = await asyncio.to_thread(
                subprocess.run, shlex.split(command), capture_output=True, text=True
            )
            assert re.fullmatch(r'\{"id":\d+\}\s*', result.stdout), result

        # The printed `pulse tail` works with the printed exports and nothing else.
        exports = dict(re.findall(r"^  export (PULSE_URL|PULSE_TOKEN)=(\S+)$", text, re.M))
        assert exports == {"PULSE_URL": base, "PULSE_TOKEN": token[1]}, text
        tail = re.search(r"^  (pulse tail .*)$", text, re.M)
        assert tail, text
        venv_bin = str(Path(sys.executable).parent)
        env = {**os.environ, **exports, "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
        env.pop("PULSE_JWT_SECRET", None)
        await run_until([*shlex.split(tail[1]), "--count", "1"], env, [r"\s*ID\s+TIME\s+DEVICE"])

        # The simulator's readings arrive on the stream.
        async with PulseClient(base, token[1]) as client, client.sse() as stream:
            seen = set()
            async for event in stream:
                seen.add(event.device_id)
                if len(seen) >= 5:
                    break
        assert seen <= {d["device_id"] for d in devices}
    finally:
        stop.set()
        await asyncio.wait_for(demo, 30)
    assert out.getvalue().rstrip().endswith("Pulse demo stopped.")


async def _run_until_ready(settings: Settings, port: int) -> tuple[asyncio.Task[None], str]:
    out = io.StringIO()
    stop = asyncio.Event()
    demo = asyncio.create_task(run_demo(settings, port=port, devices=3, out=out, stop=stop))
    demo.stop = stop  # type: ignore[attr-defined]
    async with asyncio.timeout(60):
        while "Press Ctrl-C" not in out.getvalue():
            if demo.done():
                demo.result()
            await asyncio.sleep(0.05)
    return demo, out.getvalue()


async def test_a_restarted_demo_keeps_its_secret_and_its_devices_tokens(
    settings: Settings,
) -> None:
    """Issue #22 item 6: the dashboard's token and the printed curl command of the first
    run still work after a restart."""
    mine = dataclasses.replace(settings, jwt_secret=None)
    port = free_port()
    demo, first = await _run_until_ready(mine, port)
    demo.stop.set()  # type: ignore[attr-defined]
    await asyncio.wait_for(demo, 30)
    demo, second = await _run_until_ready(mine, port)
    try:
        token = re.search(r"export PULSE_TOKEN=(\S+)", first)
        device = re.search(r"X-Provision-Token: (\S+)'", first)
        assert token and device, first
        assert device[0] in second  # the same device token, printed again
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base) as http:
            r = await http.get(
                "/api/v1/customer/devices", headers={"Authorization": f"Bearer {token[1]}"}
            )
            assert r.status_code == 200 and len(r.json()["devices"]) == 3
            device_id = r.json()["devices"][0]["device_id"]
            r = await http.post(
                f"/ingest/v1/tenant/demo/device/{device_id}/telemetry",
                json={"metrics": {"temp": 1.0}},
                headers={"X-Provision-Token": device[1]},
            )
            assert r.status_code == 201
        state = (mine.data_dir / "demo" / "demo-state.json").stat()
        assert state.st_mode & 0o077 == 0  # its owner's only
    finally:
        demo.stop.set()  # type: ignore[attr-defined]
        await asyncio.wait_for(demo, 30)


async def test_a_second_demo_on_the_same_folder_is_refused(settings: Settings) -> None:
    demo, _ = await _run_until_ready(settings, free_port())
    try:
        second = run_demo(settings, port=free_port(), out=io.StringIO(), stop=asyncio.Event())
        with pytest.raises(DemoError, match="a demo is already running with its data in "):
            await asyncio.wait_for(second, 30)
    finally:
        demo.stop.set()  # type: ignore[attr-defined]
        await asyncio.wait_for(demo, 30)
    demo, _ = await _run_until_ready(settings, free_port())  # the first one's lock is gone
    demo.stop.set()  # type: ignore[attr-defined]
    await asyncio.wait_for(demo, 30)


async def test_a_run_that_signs_with_another_secret_says_so(settings: Settings) -> None:
    """The saved secret, then PULSE_JWT_SECRET (the earlier link stops working: said),
    then PULSE_JWT_SECRET again (nothing to say)."""
    said = []
    for secret in (None, settings.jwt_secret, settings.jwt_secret):
        demo, printed = await _run_until_ready(
            dataclasses.replace(settings, jwt_secret=secret), free_port()
        )
        demo.stop.set()  # type: ignore[attr-defined]
        await asyncio.wait_for(demo, 30)
        said.append("signs tokens with another secret" in printed)
    assert said == [False, True, False]
