"""Every Python example in docs/client.md runs as written, against a real server."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.support import provision_device, run_until

pytestmark = pytest.mark.timeout(120)

DOC = Path(__file__).parents[2] / "docs" / "client.md"

# What each example prints once it works (each pattern starts a line), by the
# heading of its section. A streaming example runs until it is stopped; the others end.
PRINTS = {
    "Telemetry over Server-Sent Events": [r"\d+ dev-000[12] \S+ \{'temp': [\d.]+\}"],
    "Telemetry over the WebSocket, with filters that change": [
        r"\d+ dev-0001 \{.*'temp': 3[5-9]",
        r"\d+ dev-0002 \{'temp': [\d.]+, 'humidity': [\d.]+\}",  # subscribed, new metrics
    ],
    "Fleet, alerts and device channels (legacy v2)": [
        r"\d+ online, \d+ stale, \d+ offline, \d+ alerts",
        r"4 THRESHOLD dev-0001 OPEN",
        r"dev-0001 \{'temp': [\d.]+, 'humidity': [\d.]+\}",
    ],
    "Tokens": [r"FleetSummary\(online=3, stale=0, offline=0, total=3, active_alerts=\d+\)"],
    "Connection notices": [r"connected SSE, live None", r"\d+ dev-000\d \{'temp'"],
    "REST helpers": [
        r"3 devices, 2 active alerts",
        r"acknowledged \d+ docs-admin",
        r"closed \d+ CLOSED",
    ],
}


def examples() -> dict[str, str]:
    """The ```python blocks of the doc, by the heading of their section."""
    found: dict[str, str] = {}
    heading = ""
    text = DOC.read_text()
    pattern = r"^## ([^\n]+)$|^```python\n(.*?)^```"
    for match in re.finditer(pattern, text, re.MULTILINE | re.DOTALL):
        if match[1]:
            heading = match[1].strip()
        else:
            assert heading not in found, f"two examples under {heading!r}"
            found[heading] = match[2]
    return found


def test_every_example_is_a_complete_script() -> None:
    found = examples()
    assert set(found) == set(PRINTS)
    for heading, code in found.items():
        compile(code, heading, "exec")
        assert "async def main() -> None:" in code and code.endswith("asyncio.run(main())\n")
        assert 'os.environ["PULSE_TOKEN"]' in code, heading


@pytest.fixture
async def fleet(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> AsyncIterator[None]:
    """Three devices reporting every 0.1 s; dev-0001 and dev-0003 too hot for a rule."""
    temps = {"dev-0001": 35.0, "dev-0002": 20.0, "dev-0003": 40.0}
    tokens = {device: await provision_device(pool, "t1", device) for device in temps}
    messages = [
        {"tenant_id": "t1", "device_id": d, "provision_token": t, "metrics": {"temp": temps[d]}}
        for d, t in tokens.items()
    ]
    for message in messages:
        message["metrics"]["humidity"] = 50.0  # type: ignore[index]
    admin = {"Authorization": "Bearer " + make_token(roles=("tenant-admin",))}
    rule = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 30, "severity": 4}
    reported = asyncio.Event()
    async with httpx.AsyncClient(base_url=server) as http:
        r = await http.post("/api/v1/customer/alert-rules", json=rule, headers=admin)
        assert r.status_code == 201

        async def report() -> None:
            while True:
                r = await http.post("/ingest/v1/batch", json={"messages": messages})
                assert r.json()["accepted"] == 3, r.text
                reported.set()
                await asyncio.sleep(0.1)  # the devices' pace, not a wait for something

        reporting = asyncio.create_task(report())
        try:
            await asyncio.wait_for(reported.wait(), 10)
            yield
        finally:
            reporting.cancel()
            [outcome] = await asyncio.gather(reporting, return_exceptions=True)
            if not isinstance(outcome, asyncio.CancelledError):
                raise AssertionError(f"the devices stopped reporting: {outcome!r}")


@pytest.mark.parametrize("heading", list(PRINTS))
async def test_example_runs_as_written(
    server: str, fleet: None, make_token: Callable[..., str], tmp_path: Path, heading: str
) -> None:
    script = tmp_path / "example.py"
    script.write_text(examples()[heading])
    env = {
        **os.environ,
        "PULSE_URL": server,
        "PULSE_TOKEN": make_token(roles=("tenant-admin",), subject="docs-admin"),
        "PYTHONUNBUFFERED": "1",  # each line as it is printed, as in a terminal
    }
    await run_until([sys.executable, str(script)], env, PRINTS[heading])
