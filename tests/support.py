"""Helpers the tests share (not fixtures)."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from pulse.auth.device_tokens import new_device_token
from pulse.config import Settings
from pulse.db.database import Database

TEST_SECRET = "test-secret-please-change-0123456789"


def deeply_nested_token(depth: int, secret: str = TEST_SECRET) -> str:
    """An HS256 token signed with ``secret`` whose claims nest ``depth`` levels
    (``json.dumps`` cannot write it: built by hand)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = b'{"exp": %d, "roles": ["customer"], "tenant_id": "t1", "x": ' % (time.time() + 300)
    signing_input = (
        b64(b'{"alg": "HS256"}') + "." + b64(claims + b"[" * depth + b"]" * depth + b"}")
    )
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(mac)


def direct_writes() -> bool:
    """PULSE_DIRECT_WRITES=0 runs the suite's servers the plain ASGI way (CI does both)."""
    return os.environ.get("PULSE_DIRECT_WRITES", "1") not in ("0", "false", "no", "off")


def dsn_for(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


async def provision_device(
    db: asyncpg.Pool | asyncpg.Connection, tenant_id: str, device_id: str
) -> str:
    """Create the tenant (if new) and a device straight in the database; return its token."""
    token, token_hash = new_device_token()
    await db.execute(
        "INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant_id
    )
    await db.execute(
        "INSERT INTO devices (tenant_id, device_id, token_hash) VALUES ($1, $2, $3)",
        tenant_id,
        device_id,
        token_hash,
    )
    return token


@contextlib.asynccontextmanager
async def running_server(
    settings: Settings, *, on_app: Callable[[Any], object] | None = None
) -> AsyncIterator[str]:
    """Serve create_app(settings) on a free loopback port until the block ends, the way
    ``pulse serve`` does (pulse.serving.serve), with a short graceful timeout.
    ``on_app`` is given the app, for a test that acts on its runtime."""
    from pulse.app import create_app
    from pulse.serving import hypercorn_config, serve

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # hypercorn owns (and closes) the socket
    config = hypercorn_config(settings, f"fd://{sock.detach()}")
    config.graceful_timeout = 2
    stop = asyncio.Event()
    app = create_app(settings)
    if on_app is not None:
        on_app(app)
    task = asyncio.create_task(serve(app, config, stop))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(base_url=url) as client:
            while True:
                if task.done():
                    task.result()
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not start")
                await asyncio.sleep(0.01)
        yield url
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def insert_readings(
    db: asyncpg.Pool | asyncpg.Connection,
    tenant_id: str,
    readings: list[tuple[str, dict[str, float]]],
) -> list[int]:
    """Commit readings the way ingest does (ids reserved under the tenant lock, one
    multi-row INSERT, NOTIFY from the trigger); return their ids."""
    await db.execute(
        "INSERT INTO tenants (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING", tenant_id
    )
    conn_cm = db.acquire() if isinstance(db, asyncpg.Pool) else contextlib.nullcontext(db)
    async with conn_cm as conn, conn.transaction():
        base = await conn.fetchval(
            "SELECT pulse_reserve_event_ids($1, $2)", tenant_id, len(readings)
        )
        await conn.execute(
            """INSERT INTO telemetry (tenant_id, id, device_id, device_time, metrics)
               SELECT $1, $2 + r.n, r.device_id, now(), r.metrics
                 FROM unnest($3::text[], $4::jsonb[])
                      WITH ORDINALITY AS r(device_id, metrics, n)""",
            tenant_id,
            base,
            [device for device, _ in readings],
            [metrics for _, metrics in readings],
        )
    return list(range(base + 1, base + 1 + len(readings)))


class SSEEvent:
    def __init__(self, event: str | None, id: str | None, data: str) -> None:
        self.event = event
        self.id = id
        self.data = data

    def json(self) -> Any:
        return json.loads(self.data)

    def __repr__(self) -> str:
        return f"SSEEvent(event={self.event!r}, id={self.id!r}, data={self.data[:60]!r})"


async def sse_events(
    response: httpx.Response,
    *,
    comments: bool = False,
    lines: AsyncIterator[str] | None = None,
) -> AsyncIterator[SSEEvent]:
    """Parse an SSE byte stream; `retry:` is skipped, comments too unless asked for
    (then each comes as an event named ``:``). ``lines``: the response's lines, read
    in part already (a response's body can be iterated once)."""
    event: str | None = None
    id_: str | None = None
    data: list[str] = []
    async for line in lines if lines is not None else response.aiter_lines():
        if line == "":
            if data or event:
                yield SSEEvent(event, id_, "\n".join(data))
            event, id_, data = None, None, []
        elif line.startswith(":"):
            if comments:
                yield SSEEvent(":", None, line[1:].strip())
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "id":
                id_ = value
            elif field == "data":
                data.append(value)


# Ports the tests pick for servers they start (and restart on the same port) come
# from a block of this test process's own, below Linux's default ephemeral range
# (32768-60999): the port of a server stopped for a moment is then never taken by
# another test process (pyproject's xdist workers) nor by a client's outgoing
# connection. Drawn at random (by a generator no test seeds) within the block.
PORT_BLOCK = 1500
FIRST_PORT = 20000
_ports = random.Random()
# The ports handed out lately: a test that asks for two before it binds either (a
# server's client and monitor ports) must not get one twice.
_handed: collections.deque[int] = collections.deque(maxlen=200)


def free_port() -> int:
    """A loopback port free now, from this test process's block."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    first = FIRST_PORT + (int(worker) if worker.isdigit() else 0) % 8 * PORT_BLOCK
    for _ in range(200):
        port = _ports.randrange(first, first + PORT_BLOCK)
        if port in _handed:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed.append(port)
        return port
    raise RuntimeError(f"no free port in {first}-{first + PORT_BLOCK - 1}")


@contextlib.asynccontextmanager
async def pulse_serve(
    *,
    data_dir: Path,
    database_url: str | None = None,
    env: dict[str, str] | None = None,
    stdout: int = asyncio.subprocess.DEVNULL,
) -> AsyncIterator[ServeProcess]:
    """`python -m pulse serve` in a subprocess on a free loopback port, until ready.

    With no ``database_url`` it runs on an embedded PostgreSQL in ``data_dir``.
    On exit it is sent SIGTERM (unless already stopped) and must exit with 0; killed
    when the test failed.
    """
    server = await start_serve(data_dir=data_dir, database_url=database_url, env=env, stdout=stdout)
    try:
        await server.wait_ready()
        yield server
    except BaseException:
        # The test failed: its error is the one to see, not a graceful stop's wait on a
        # request it left in flight.
        server.kill(with_workers=True)
        await server.stop()
        raise
    await server.stop()


async def start_serve(
    *,
    data_dir: Path,
    database_url: str | None = None,
    env: dict[str, str] | None = None,
    stdout: int = asyncio.subprocess.DEVNULL,
    port: int | None = None,
    script: str | None = None,
) -> ServeProcess:
    """`python -m pulse serve` in a subprocess (on ``port``, or a free one); not yet ready.
    With ``script``, ``python -c script`` instead, which ends in serving (after changing
    something first). The caller stops it."""
    port = port or free_port()
    child_env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    child_env.update(PULSE_DATA_DIR=str(data_dir), PULSE_JWT_SECRET=TEST_SECRET, PORT=str(port))
    if database_url:
        child_env["DATABASE_URL"] = database_url
    child_env.update(env or {})
    command = ["-c", script] if script is not None else ["-m", "pulse", "serve"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        env=child_env,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )
    return ServeProcess(proc, f"http://127.0.0.1:{port}")


class ServeProcess:
    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc = proc
        self.url = url
        self.stdout = b""
        self.stderr = b""
        self.killed = False

    async def wait_ready(self, timeout: float = 60) -> None:
        async with httpx.AsyncClient(base_url=self.url) as client:
            deadline = asyncio.get_running_loop().time() + timeout
            while asyncio.get_running_loop().time() < deadline:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"pulse serve exited with {self.proc.returncode}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError("pulse serve did not become ready")

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; returns the exit code (asserting a clean exit)."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = await asyncio.wait_for(self.proc.communicate(), timeout)
        except TimeoutError:
            # Killed, with what it said: a bare TimeoutError hid the reason (and, when a
            # test had failed first, took the summary's line from its own error).
            self.kill(with_workers=True)
            stdout, stderr = await self.proc.communicate()
            said = (self.stderr + (stderr or b"")).decode(errors="replace")[-3000:]
            raise AssertionError(f"did not stop within {timeout:g} s:\n{said}") from None
        self.stdout += stdout or b""
        self.stderr += stderr or b""
        clean = self.proc.returncode == 0 or self.killed
        assert clean, self.stderr.decode(errors="replace")[-3000:]
        return self.proc.returncode

    def kill(self, *, with_workers: bool = False) -> None:
        """SIGKILL: a crash, with no cleanup (stop() then accepts the exit). Workers
        outlive their supervisor for a moment (``with_workers``: not even that)."""
        self.killed = True
        if with_workers:
            with contextlib.suppress(OSError):  # gone already
                children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
                for pid in map(int, children.read_text().split()):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):  # exited already
            self.proc.kill()


def seam(pool: asyncpg.Pool, dsn: str = "") -> Database:
    """The database seam over a test's pool, for code that takes a Database (``dsn`` is
    needed only for dedicated connections)."""
    return Database(pool, dsn)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` on every turn of the loop until it holds, for at most ``timeout``
    seconds: for what has no event of its own to wait on."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.001)


def nats_server_binary() -> str | None:
    """Debian's nats-server (.ci/run installs the package); None when it is missing."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    return shutil.which("nats-server", path=path)


NATS_MISSING = (
    "nats-server is not installed: apt-get install nats-server (the Debian package .ci/run "
    "installs), or put it on the PATH"
)


class NatsServer:
    """A nats-server of a test's own on free loopback ports (client and monitoring), which
    the test may stop, kill and start again on the same ports."""

    def __init__(self, *, max_payload: int | None = None) -> None:
        binary = nats_server_binary()
        assert binary is not None, NATS_MISSING
        self.binary = binary
        self.port = free_port()
        self.monitor_port = free_port()
        self.max_payload = max_payload  # None: the server's default, 1 MiB
        self.proc: asyncio.subprocess.Process | None = None
        self._config: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 10) -> None:
        options: list[str] = []
        if self.max_payload is not None:  # a setting of the configuration file only
            if self._config is None:
                self._config = tempfile.TemporaryDirectory(prefix="pulse-nats-")
            config = Path(self._config.name) / "nats.conf"
            config.write_text(f"max_payload: {self.max_payload}\n")
            options = ["-c", str(config)]
        self.proc = await asyncio.create_subprocess_exec(
            self.binary,
            *options,
            "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(timeout):
            while True:
                assert self.proc.returncode is None, "nats-server exited at start"
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                return

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        self.proc = None
        if self._config is not None:
            self._config.cleanup()
            self._config = None

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self.proc = None

    async def subscriptions(self) -> dict[str, set[str]]:
        """Each client connection's subjects, by the connection's name (NATS monitoring)."""
        async with httpx.AsyncClient(timeout=5) as http:
            r = await http.get(f"http://127.0.0.1:{self.monitor_port}/connz", params={"subs": 1})
        return {
            str(c.get("name", "")): set(c.get("subscriptions_list") or [])
            for c in r.json().get("connections") or []
        }


async def run_until(
    argv: list[str],
    env: dict[str, str],
    patterns: list[str],
    *,
    cwd: Path | None = None,
    timeout: float = 60,
    interrupt: bool = False,
) -> list[str]:
    """Run ``argv`` (and what it starts) until every pattern starts a line of its output
    (stdout and stderr), or until it ends by itself, then with status 0; killed if it
    still runs. Its lines. With ``interrupt``, it is sent Ctrl-C's SIGINT instead, and
    must then end with status 0 and no traceback, as a program a user stops should."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            lines.append(line.decode())

    reader = asyncio.create_task(read())
    expected = [re.compile(p, re.MULTILINE) for p in patterns]

    def printed() -> bool:
        return all(any(p.match(line) for line in lines) for p in expected)

    try:
        try:
            await until(lambda: printed() or proc.returncode is not None, timeout)
        except TimeoutError:
            raise AssertionError(f"timed out; it printed:\n{''.join(lines)}") from None
        if proc.returncode is not None:
            await reader
            assert proc.returncode == 0, "".join(lines)
        assert printed(), "".join(lines)
        if interrupt and proc.returncode is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
                    await reader
            except TimeoutError:
                raise AssertionError(
                    f"still running {timeout} s after Ctrl-C; it printed:\n{''.join(lines)}"
                ) from None
            assert proc.returncode == 0, "".join(lines)
            assert not any(line.startswith("Traceback") for line in lines), "".join(lines)
    finally:
        if proc.returncode is None:  # without interrupt, Ctrl-C is not the point
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        reader.cancel()
    return lines


async def every_page(
    http: httpx.AsyncClient, url: str, items: str, key: str, headers: dict[str, str], **params: str
) -> list[list[Any]]:
    """The ``key`` of each item of each page of a keyset-paged list (the answer's
    ``items`` and ``next_cursor``), following next_cursor to the end; each cursor is
    the last item's key."""
    pages: list[list[Any]] = []
    while True:
        response = await http.get(url, params=params, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {items, "next_cursor"}
        pages.append([item[key] for item in body[items]])
        if body["next_cursor"] is None:
            return pages
        assert body["next_cursor"] == str(pages[-1][-1])
        params = {**params, "cursor": body["next_cursor"]}


def metric(text: str, name: str) -> float:
    """The value of the sample ``name`` (with its labels, as written) in a /metrics
    answer; 0 when it is not there."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0
