"""The README's Quickstart demo line, run as written in a fresh virtual environment with no
DATABASE_URL, reaches a working dashboard; Ctrl-C then stops everything cleanly."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from pulse.client import PulseClient
from tests.dashboard.browser import chromium_page, wait_until
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.readme, pytest.mark.timeout(400)]


def quickstart_line() -> str:
    """The first shell block of the README's Quickstart section."""
    quickstart = ROOT.joinpath("README.md").read_text().split("## Quickstart", 1)[1]
    block = re.search(r"```sh\n(.+?)\n```", quickstart, re.S)
    assert block, "no sh block in the Quickstart"
    return block[1]


def copy_checkout(target: Path) -> None:
    """The files of this checkout a fresh clone would have (tracked or not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = ROOT / name.decode()
        if source.is_file():
            (target / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name.decode())


def clean_environment(home: Path, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PULSE_", "VIRTUAL_ENV", "PYTHON")) and k not in ("DATABASE_URL",)
    }
    # `python3` is the interpreter running these tests, as on a machine with one Python.
    env["PATH"] = f"{Path(sys.base_prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR") or str(Path.home() / ".cache" / "pip")
    env.update(HOME=str(home), PORT=str(port))
    env.pop("XDG_DATA_HOME", None)
    return env


async def test_the_readme_demo_line_reaches_a_working_dashboard(tmp_path: Path) -> None:
    line = quickstart_line()
    assert line.endswith("pulse demo"), line
    checkout, home = tmp_path / "pulse", tmp_path / "home"
    checkout.mkdir()
    home.mkdir()
    copy_checkout(checkout)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        line,
        cwd=checkout,
        env=clean_environment(home, port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal gives it
    )
    assert proc.stdout is not None
    output = []
    try:
        async with asyncio.timeout(300):
            async for raw in proc.stdout:
                output.append(raw.decode(errors="replace"))
                if "Press Ctrl-C" in raw.decode(errors="replace"):
                    break
        text = "".join(output)
        dashboard = re.search(r"Dashboard:\s+(http://127\.0\.0\.1:\d+)/#token=(\S+)", text)
        assert dashboard, text[-3000:]
        base, token = dashboard[1], dashboard[2]
        assert base == f"http://127.0.0.1:{port}"
        assert (home / ".local/share/pulse/demo/pgdata/PG_VERSION").exists()

        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/readyz")).status_code == 200
        async with PulseClient(base, token) as client:
            assert (await client.fleet_summary()).total == 25

        async with chromium_page() as page:
            # Without Chromium (only outside CI) the checks above, over HTTP, must do.
            if page is not None:
                await page.goto(f"{base}/#token={token}")
                await page.wait_for_selector("#connection[data-state=live]", timeout=20_000)
                await wait_until(page, "window.pulseDashboard.count >= 25")
                assert await page.locator(".device").count() == 25
                assert await page.inner_text("#sum-total") == "25"
                assert "#token" not in page.url  # the token left the address bar
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        rest, _ = await asyncio.wait_for(proc.communicate(), 60)
        output.append(rest.decode(errors="replace"))
    text = "".join(output)
    assert proc.returncode == 0, text[-3000:]
    assert text.rstrip().endswith("Pulse demo stopped."), text[-3000:]
    pgrep = await asyncio.to_thread(
        subprocess.run, ["pgrep", "-f", str(home)], capture_output=True, text=True
    )
    leftovers = pgrep.stdout.strip()
    assert not leftovers, f"processes left running: {leftovers}"
