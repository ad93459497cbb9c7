"""What every scenario needs: its own database and server processes, and figures."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import psutil

from pulse.auth.dev_tokens import mint_token
from pulse.db.migrate import migrate
from pulse.db.pool import connect

SECRET = "benchmark-secret-0123456789abcdef"


@dataclasses.dataclass
class Figure:
    scenario: str
    metric: str
    value: float
    unit: str
    target: str = ""
    baseline: float | None = None  # the same-run reference the ratio is against
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline:
            return self.value / self.baseline
        return None


def percentile(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token(tenant_id: str | None, roles: Sequence[str] = ("tenant-admin",)) -> str:
    return mint_token(SECRET, tenant_id=tenant_id, roles=roles, lifetime_s=24 * 3600)


class Postgres:
    """An embedded PostgreSQL for the whole run (or the server at ``admin_dsn``)."""

    def __init__(self, admin_dsn: str | None = None) -> None:
        self._admin_dsn = admin_dsn
        self._stack = contextlib.ExitStack()
        self._data: Path | None = None  # the embedded server's, when it is ours
        self._created: list[str] = []  # dropped at the end on another server

    async def __aenter__(self) -> Postgres:
        if self._admin_dsn is None:
            from pulse.db.embedded import embedded_postgres

            data = Path(
                self._stack.enter_context(tempfile.TemporaryDirectory(prefix="pulse-bench-"))
            )
            self._admin_dsn = self._stack.enter_context(embedded_postgres(data))
            self._data = data
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._data is None and self._created:  # another server keeps no leftovers
                admin = await asyncpg.connect(self.admin_dsn)
                try:
                    for name in self._created:
                        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    await admin.close()
        finally:
            self._stack.close()

    @property
    def admin_dsn(self) -> str:
        assert self._admin_dsn is not None
        return self._admin_dsn

    def pids(self) -> list[int]:
        """The server's processes (for CPU accounting): the embedded postmaster and its
        children; for another server, every local postgres process."""
        pidfile = self._data / "pgdata" / "postmaster.pid" if self._data else None
        if pidfile is not None and pidfile.exists():
            postmaster = psutil.Process(int(pidfile.read_text().split()[0]))
            return [postmaster.pid, *(child.pid for child in postmaster.children())]
        found = []
        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                if proc.info["name"] == "postgres" or "postgres:" in " ".join(
                    proc.info["cmdline"] or []
                ):
                    found.append(proc.pid)
            except psutil.Error:
                pass
        return found

    async def create_database(self, prefix: str = "bench") -> str:
        """An empty database (dropped at the end of the run on another server)."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        self._created.append(name)
        return urlunsplit(urlsplit(self.admin_dsn)._replace(path="/" + name))

    async def fresh_database(self) -> str:
        """A database with every migration applied."""
        dsn = await self.create_database()
        conn = await connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        return dsn


class PulseServer:
    """`python -m pulse serve` on a free loopback port."""

    def __init__(self, dsn: str, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "PULSE_JWT_SECRET": SECRET,
            "PORT": str(self.port),
            "PULSE_LOG_LEVEL": "WARNING",
            "PULSE_INGEST_RATE_PER_DEVICE": "1000000",
            "PULSE_INGEST_BURST_PER_DEVICE": "1000000",
            "PULSE_INGEST_RATE_PER_TENANT": "1000000000",
            "PULSE_INGEST_BURST_PER_TENANT": "1000000000",
            "PULSE_MAX_CONNECTIONS_PER_TENANT": "100000",
            "PULSE_MAX_CONNECTIONS": "100000",
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        # The server's log, shown when a scenario fails.
        self._log = tempfile.TemporaryFile()  # noqa: SIM115  closed in __aexit__

    def command(self) -> list[str]:
        return [sys.executable, "-m", "pulse", "serve", "--port", str(self.port)]

    async def __aenter__(self) -> PulseServer:
        self.proc = subprocess.Popen(
            self.command(), env=self._env, stdout=subprocess.DEVNULL, stderr=self._log
        )
        async with httpx.AsyncClient(base_url=self.url) as client:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/readyz")).status_code == 200:
                        return self
                if self.proc.poll() is not None:
                    self._log.seek(0)
                    said = self._log.read().decode(errors="replace").strip().splitlines()[-20:]
                    raise RuntimeError(
                        f"{self.command()[2]} exited during startup: " + "\n".join(said)
                    )
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.command()[2]} did not become ready")

    async def __aexit__(self, exc_type: object, *_: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if exc_type is not None:
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace").splitlines()[-40:]
            print("   server log (last 40 lines):", *tail, sep="\n   ", file=sys.stderr)
        self._log.close()

    def pids(self) -> list[int]:
        """The server's process and its workers, if it runs several."""
        if self.proc is None:
            return []
        return [self.proc.pid, *(child.pid for child in self.ps.children())]

    def connections_per_process(self) -> list[int]:
        """Established client connections each server process holds, fewest first:
        with workers sharing one listening socket, the kernel gives each connection to
        whichever process accepts first, so a few kept-alive clients may all land on one."""
        serving = self.ps.children() or [self.ps]  # the workers, or the one process
        return sorted(
            sum(c.status == "ESTABLISHED" and c.laddr.port == self.port for c in conns)
            for conns in (process.net_connections("tcp") for process in serving)
        )

    @property
    def ps(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def cpu_s(self) -> float:
        times = self.ps.cpu_times()
        return float(times.user + times.system)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)


class TypicalServer(PulseServer):
    """The typical stack (benchmarks/typical.py: Starlette, uvicorn, asyncpg) on a free
    loopback port, for the same requests."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self._dsn = dsn

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "benchmarks.typical", "--dsn", self._dsn, "--port", str(self.port)
        ]  # fmt: skip


@contextlib.contextmanager
def cpu_meter(pids: Sequence[int] = ()) -> Iterator[dict[str, float]]:
    """CPU seconds spent by this process (the load generator) and ``pids`` inside the block."""
    me = psutil.Process()
    others = [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]

    def used(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return float(t.user + t.system)
        except psutil.Error:
            return 0.0

    start = {p.pid: used(p) for p in [me, *others]}
    wall = time.perf_counter()
    out: dict[str, float] = {}
    yield out
    out["wall_s"] = time.perf_counter() - wall
    out["client_cpu_s"] = used(me) - start[me.pid]
    out["others_cpu_s"] = sum(used(p) - start[p.pid] for p in others)


async def provision(url: str, tenant_id: str, devices: int) -> dict[str, str]:
    """Create devices through the API; return device_id -> provision token."""
    tokens = {}
    headers = {"Authorization": "Bearer " + token(tenant_id)}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        for i in range(devices):
            device_id = f"dev-{i:05d}"
            r = await client.post("/api/v1/customer/devices", json={"device_id": device_id})
            r.raise_for_status()
            tokens[device_id] = r.json()["provision_token"]
    return tokens


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    async with asyncio.timeout(seconds):
        yield


def describe(values: Sequence[float]) -> dict[str, Any]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "n": len(values)}


def nats_server_binary() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("nats-server", path=path)


class NatsProcess:
    """A nats-server on a free loopback port for the run (Debian's package)."""

    def __init__(self) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise RuntimeError("nats-server is not installed (apt-get install nats-server)")
        self.binary = binary
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> NatsProcess:
        self.proc = subprocess.Popen(
            [self.binary, "-a", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return self
        raise RuntimeError("nats-server did not start")

    async def __aexit__(self, *_: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def pids(self) -> list[int]:
        return [] if self.proc is None else [self.proc.pid]


async def listening_backends(dsn: str) -> int:
    """Backends of the database named as Pulse names its listeners."""
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name = 'pulse listener'"
            )
        )
    finally:
        await conn.close()


def cpu_ns(pid: int) -> int:
    """CPU time of a process, all its threads, in ns (/proc/PID/task/*/schedstat: exact,
    where psutil counts ticks of 10 ms); 0 once it is gone."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total
    except (OSError, ValueError, IndexError):
        try:
            t = psutil.Process(pid).cpu_times()
            return int((t.user + t.system) * 1e9)
        except psutil.Error:
            return 0


class BackendCpu:
    """CPU seconds spent, over the block, by the backends of a database that exist at its
    end (those that started within it from zero), the load generator's own excluded;
    ``by_name`` splits them by application name (or backend type, e.g. autovacuum).

    ``server_seconds``: the whole PostgreSQL server over the block, which the backends
    leave out: the WAL writer, the checkpointer, the background writer, autovacuum
    workers and backends that ended within the block (the postmaster's reaped
    children). Meaningful on a server that the benchmark has to itself (the embedded
    one); the machine's server also works for others."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.seconds = 0.0
        self.server_seconds = 0.0
        self.backends = 0
        self.by_name: dict[str, float] = {}
        self._start: dict[int, int] = {}
        self._postmaster: psutil.Process | None = None
        self._server_start = 0

    async def _pids(self) -> dict[int, str]:
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT pid, coalesce(nullif(application_name, ''), backend_type) AS name"
                " FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            if self._postmaster is None:
                backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
                self._postmaster = backend.parent()
        finally:
            await conn.close()
        return {r["pid"]: r["name"] for r in rows}

    def _server_ns(self) -> int:
        """The server's CPU so far: the postmaster, its children alive and those reaped."""
        if self._postmaster is None:
            return 0
        try:
            reaped = self._postmaster.cpu_times()
            total = cpu_ns(self._postmaster.pid)
            total += int((reaped.children_user + reaped.children_system) * 1e9)
            children = self._postmaster.children()
        except psutil.Error:
            return 0
        return total + sum(cpu_ns(child.pid) for child in children)

    async def __aenter__(self) -> BackendCpu:
        self._start = {pid: cpu_ns(pid) for pid in await self._pids()}
        self._server_start = self._server_ns()
        return self

    async def __aexit__(self, *_: object) -> None:
        server_end = self._server_ns()
        pids = await self._pids()
        self.backends = len(pids)
        for pid, name in pids.items():
            spent = (cpu_ns(pid) - self._start.get(pid, 0)) / 1e9
            self.by_name[name] = self.by_name.get(name, 0.0) + spent
        self.seconds = sum(self.by_name.values())
        self.server_seconds = max(0.0, (server_end - self._server_start) / 1e9)


def processes_cpu_s(pids: Sequence[int]) -> float:
    return sum(cpu_ns(pid) for pid in pids) / 1e9
