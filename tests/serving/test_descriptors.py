"""A process out of file descriptors says so (pulse.serving.descriptors), and serves again
once they are free.

uvloop's libuv closes a connection it cannot accept without calling back into Python:
an audit held every descriptor of a server with idle connections, and every other
client got a reset, with nothing in the log. Here ``pulse serve`` runs with a limit of
FILES open files and CLIENTS connections that never send a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from pulse.serving import descriptors
from tests.support import ServeProcess, start_serve

pytestmark = pytest.mark.timeout(120)

FILES = 128
CLIENTS = 200
SERVE_WITH_FEW_FILES = f"""
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, ({FILES}, {FILES}))
from pulse.cli import main
main(["serve"])
"""
SAID = "cannot accept connections: this process has no file descriptor left"


class Log:
    """The server's stderr, read as it comes."""

    def __init__(self, server: ServeProcess) -> None:
        self.lines: list[str] = []
        self._server = server
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        stream = self._server.proc.stderr
        assert stream is not None
        async for line in stream:
            self.lines.append(line.decode(errors="replace"))

    async def said(self, text: str, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            while not (found := [line for line in self.lines if text in line]):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        return found[0]

    async def stop(self) -> str:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._server.stop()
        return "".join(self.lines) + self._server.stderr.decode(errors="replace")


async def exhausted_total(url: str) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        text = (await http.get("/metrics")).text
    [line] = [
        line for line in text.splitlines() if line.startswith("pulse_open_files_exhausted_total")
    ]
    return float(line.split()[1])


async def healthz(url: str) -> int | None:
    """/healthz's status, or None when the connection was closed unanswered."""
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            return (await http.get("/healthz")).status_code
    except httpx.TransportError:
        return None


def test_a_file_can_be_opened_here() -> None:
    assert descriptors.out_of_descriptors() is None


async def test_running_out_of_descriptors_is_logged_and_counted_and_passes(
    database_url: str, tmp_path: Path
) -> None:
    env = {"PULSE_HTTP_IDLE_TIMEOUT_S": "120", "PULSE_HTTP_FIRST_REQUEST_TIMEOUT_S": "120"}
    server = await start_serve(
        data_dir=tmp_path, database_url=database_url, env=env, script=SERVE_WITH_FEW_FILES
    )
    log = Log(server)
    idle: list[asyncio.StreamWriter] = []
    try:
        await server.wait_ready()
        assert await exhausted_total(server.url) == 0
        address = urlsplit(server.url)
        for _ in range(CLIENTS):  # never a byte from any of them
            _, writer = await asyncio.open_connection(address.hostname, address.port)
            idle.append(writer)
        line = await log.said(SAID, timeout=20)
        assert "WARNING" in line and f"ulimit -n {FILES}" in line
        assert "LimitNOFILE" in line and "PULSE_MAX_CONNECTIONS" in line and "proxy" in line
        assert await healthz(server.url) is None  # the state the line is about
        for writer in idle:
            writer.close()
        idle.clear()
        async with asyncio.timeout(20):
            while await healthz(server.url) != 200:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        assert await exhausted_total(server.url) >= 1
        await log.said("file descriptors are free again", timeout=10)
    finally:
        for writer in idle:
            writer.close()
        said = await log.stop()
    # Throttled: one line when it began, then at most one per 10 s.
    assert said.count(SAID) <= 3, said
