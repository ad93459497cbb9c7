"""A `pulse serve` subprocess that can be killed and brought back on the same port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tests.support import TEST_SECRET, ServeProcess, free_port


class RestartableServer:
    def __init__(self, database_url: str, data_dir: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        self.env.update(
            DATABASE_URL=database_url,
            PULSE_DATA_DIR=str(data_dir),
            PULSE_JWT_SECRET=TEST_SECRET,
            PORT=str(self.port),
        )
        self.env.update(env or {})
        self.process: ServeProcess | None = None
        self.starts = 0

    async def start(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pulse",
            "serve",
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self.process = ServeProcess(proc, self.url)
        self.starts += 1
        await self.process.wait_ready()

    async def kill(self) -> None:
        """SIGKILL: no goodbye to any client, as when a machine dies."""
        assert self.process is not None
        self.process.proc.send_signal(signal.SIGKILL)
        await self.process.proc.wait()
        self.process = None

    async def stop(self) -> None:
        """SIGTERM, asserting a clean exit."""
        if self.process is not None:
            await self.process.stop()
            self.process = None


@contextlib.asynccontextmanager
async def restartable_server(
    database_url: str, data_dir: Path, env: dict[str, str] | None = None
) -> AsyncIterator[RestartableServer]:
    server = RestartableServer(database_url, data_dir, env)
    await server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.proc.returncode is None:
            await server.stop()
