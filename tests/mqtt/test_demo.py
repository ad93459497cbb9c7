"""`pulse demo` with Mosquitto installed: a broker of its own, every fifth device publishing
over MQTT, and a mosquitto_pub command that works as printed; again after a restart."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from pulse.config import Settings
from pulse.sim import broker
from pulse.sim.broker import Mosquitto
from pulse.sim.demo import run_demo
from tests.support import free_port

pytestmark = pytest.mark.timeout(120)


async def run_until_ready(settings: Settings, port: int) -> tuple[asyncio.Task[None], str]:
    out = io.StringIO()
    stop = asyncio.Event()
    demo = asyncio.create_task(
        run_demo(settings, port=port, devices=10, rate=5, out=out, stop=stop)
    )
    demo.stop = stop  # type: ignore[attr-defined]
    async with asyncio.timeout(60):
        while "Press Ctrl-C" not in out.getvalue():
            if demo.done():
                demo.result()
            await asyncio.sleep(0.05)
    return demo, out.getvalue()


async def mqtt_rows(pool: asyncpg.Pool, device_id: str) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM telemetry WHERE device_id = $1 AND seq IS NOT NULL", device_id
        )
    )


async def test_the_demo_sends_every_fifth_device_over_its_own_broker(
    settings: Settings, mosquitto_binary: None, pool: asyncpg.Pool
) -> None:
    port = free_port()
    for run in ("first", "restarted"):
        demo, text = await run_until_ready(settings, port)
        try:
            assert "2 of the devices publish over MQTT" in text, text
            before = await mqtt_rows(pool, "dev-0005")
            async with asyncio.timeout(30):
                while await mqtt_rows(pool, "dev-0005") <= before:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert await mqtt_rows(pool, "dev-0001") == 0, run  # over HTTP: no seq
            if shutil.which("mosquitto_pub") is None:
                continue
            printed = re.search(r"  (mosquitto_pub .*?\}'\n)", text, re.S)
            assert printed, text
            command = shlex.split(printed[1].replace("\\\n", " "))
            result = await asyncio.to_thread(subprocess.run, command, capture_output=True)
            assert result.returncode == 0, result
            async with asyncio.timeout(10):
                while not await pool.fetchval(  # noqa: ASYNC110
                    "SELECT count(*) FROM telemetry WHERE metrics = '{\"temp\": 21.5}'"
                ):
                    await asyncio.sleep(0.05)
        finally:
            demo.stop.set()  # type: ignore[attr-defined]
            await asyncio.wait_for(demo, 30)


async def test_a_broker_left_behind_in_the_folder_is_stopped_first(
    mosquitto_binary: None, tmp_path: Path
) -> None:
    """A demo killed outright (SIGKILL) cannot stop its broker, which runs in a session of
    its own: the next start in that folder stops it first, so one broker serves it."""
    left = Mosquitto(tmp_path / "mosquitto")
    await left.start()
    assert left.proc is not None
    again = Mosquitto(tmp_path / "mosquitto")
    try:
        await again.start()
        assert await asyncio.wait_for(left.proc.wait(), 10) is not None
    finally:
        await again.stop()


async def test_a_port_taken_before_the_broker_binds_it_is_chosen_again(
    mosquitto_binary: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's broker listens on a port found free a moment before: taken by then,
    mosquitto exits at start, and a port of its own choosing is chosen again."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        ports = iter([taken.getsockname()[1]])
        monkeypatch.setattr(broker, "free_port", lambda: next(ports, None) or free_port())
        started = Mosquitto(tmp_path / "mosquitto")
        assert started.port == taken.getsockname()[1]
        await started.start()
        try:
            assert started.port != taken.getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", started.port)
            writer.close()
        finally:
            await started.stop()


async def test_a_broker_started_again_in_its_folder_keeps_its_port_while_free(
    mosquitto_binary: None, tmp_path: Path
) -> None:
    """From the user-experience audit: the demo's broker took a new port at each start,
    so the mosquitto_pub command the first run printed stopped working after a restart.
    Now it listens where it did last time, unless that port is taken by then."""
    first = Mosquitto(tmp_path / "mosquitto")
    await first.start()
    port = first.port
    # A client connected as it stops: the broker closes the connection, which then
    # waits in TIME-WAIT on that port (the port had moved at every ordinary restart).
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await first.stop()
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    again = Mosquitto(tmp_path / "mosquitto")
    await again.start()
    try:
        assert again.port == port
    finally:
        await again.stop()
    # Another program listening there (the connection above is still in TIME-WAIT).
    with socket.create_server(("127.0.0.1", port)):
        elsewhere = Mosquitto(tmp_path / "mosquitto")
        await elsewhere.start()
        try:
            assert elsewhere.port != port
            _, writer = await asyncio.open_connection("127.0.0.1", elsewhere.port)
            writer.close()
        finally:
            await elsewhere.stop()


def test_a_port_whose_connections_wait_in_time_wait_is_free_again(tmp_path: Path) -> None:
    """From the first-ten-minutes audit: the broker closes its clients' connections when
    it stops, and they wait in TIME-WAIT for a minute; the probe of the last port, bound
    without SO_REUSEADDR (which mosquitto binds with), failed on them, so an ordinary
    restart of the demo moved its broker to a new port."""
    with socket.create_server(("127.0.0.1", 0)) as listener:  # SO_REUSEADDR, as mosquitto
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server's side closes first: its side waits in TIME-WAIT
            assert client.recv(1) == b""
    assert _time_wait_on(port), f"no connection in TIME-WAIT on port {port}"
    remembered = tmp_path / "port"
    remembered.write_text(f"{port}\n")
    assert broker._free_or_none(remembered) == port
    with socket.create_server(("127.0.0.1", port)):  # but a port listened on is taken
        assert broker._free_or_none(remembered) is None


def _time_wait_on(port: int, within_s: float = 10.0) -> bool:
    """Whether a TCP connection of 127.0.0.1:port is in TIME-WAIT, once it is (Linux)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if local == f"0100007F:{port:04X}" and state == "06":  # TCP_TIME_WAIT
                return True
        time.sleep(0.01)  # a kernel state, with nothing to await
    return False


async def test_ctrl_c_stops_the_demo_and_its_broker_without_a_warning(
    mosquitto_binary: None, database_url: str, tmp_path: Path
) -> None:
    """Ctrl-C in a terminal signals its whole foreground process group: the broker, in a
    session of its own, is stopped by the demo after the server let go of it; before, it
    died at the same moment and Pulse warned of a lost broker on the way out."""
    env = {**os.environ, "DATABASE_URL": database_url, "PULSE_DATA_DIR": str(tmp_path)}
    env.pop("PULSE_MQTT_URL", None)
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pulse", "demo", "--port", str(free_port()), "--devices", "5",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # the group a terminal would signal
    )  # fmt: skip
    assert demo.stdout is not None and demo.stderr is not None
    try:
        async with asyncio.timeout(60):
            while b"Press Ctrl-C" not in await demo.stdout.readline():
                pass
        pid_file = tmp_path / "demo" / "mosquitto" / "mosquitto.pid"
        broker = int(pid_file.read_text())
        os.killpg(demo.pid, signal.SIGINT)
        out, err = await asyncio.wait_for(demo.communicate(), 30)
    finally:
        if demo.returncode is None:
            os.killpg(demo.pid, signal.SIGKILL)
            await demo.wait()
    assert demo.returncode == 0, err.decode()
    assert b"Pulse demo stopped." in out
    warnings = [line for line in err.splitlines() if b"WARNING" in line]
    if not await autovacuumed(database_url):  # said, rightly (tests/test_startup.py)
        warnings = [line for line in warnings if b"pulse.db.vacuum" not in line]
    assert not warnings and b"Traceback" not in err, err.decode()
    with pytest.raises(ProcessLookupError):  # stopped and reaped by the demo
        os.kill(broker, 0)


async def autovacuumed(database_url: str) -> bool:
    """Whether the test's PostgreSQL runs autovacuum (this machine's does not: CI's second
    pass runs the database tests against it)."""
    conn = await asyncpg.connect(database_url)
    try:
        return bool(
            await conn.fetchval(
                "SELECT current_setting('autovacuum')::bool "
                "AND current_setting('track_counts')::bool"
            )
        )
    finally:
        await conn.close()
