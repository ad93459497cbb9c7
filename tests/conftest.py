"""Shared fixtures: a real PostgreSQL, a template database, real servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.auth.dev_tokens import mint_token
from pulse.config import Settings
from pulse.db.database import Database
from pulse.db.migrate import migrate
from pulse.db.pool import connect, create_pool
from pulse.logs import ACCESS_LOGGER, QUIET_LIBRARIES, SERVER_LOGGER
from tests.support import (
    NATS_MISSING,
    TEST_SECRET,
    NatsServer,
    direct_writes,
    dsn_for,
    free_port,
    nats_server_binary,
    running_server,
)


def _share_the_default_ssl_context() -> None:
    """httpx builds a new SSL context for every client (certifi's CA bundle loaded again:
    about 50 ms of CPU), even for one that only ever speaks http:// on loopback; the
    suite makes one per server it starts and one or more per test. The default one is
    built once here and shared; a client asking for anything else gets its own."""
    from httpx._transports import default

    build = default.create_ssl_context
    shared = build()

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
        if verify is True and cert is None and trust_env:
            return shared
        return build(verify=verify, cert=cert, trust_env=trust_env)

    default.create_ssl_context = create_ssl_context  # type: ignore[assignment]


_share_the_default_ssl_context()


def _take_ctrl_c_as_a_terminal_does() -> None:
    """A shell starts a background job (`.ci/run ... &`, a script's `cmd &`) with SIGINT
    ignored, and an ignored signal stays ignored in every program it starts: the scripts
    the tests stop with Ctrl-C (the README's, which count on Python's KeyboardInterrupt)
    then ran on, and their tests failed on a timeout. The suite puts back the default
    that a terminal gives, so that its programs get the Ctrl-C their users would."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_take_ctrl_c_as_a_terminal_does()


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A PostgreSQL server: PULSE_TEST_DATABASE_URL, else an embedded one for this session."""
    url = os.environ.get("PULSE_TEST_DATABASE_URL")
    if url:
        yield url
        return
    from pulse.db.embedded import embedded_postgres

    with embedded_postgres(tmp_path_factory.mktemp("embedded-pg")) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def template_db(pg_admin_dsn: str) -> Iterator[str]:
    """A database migrated once per session; each test copies it."""
    name = f"pulse_tpl_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await connect(dsn_for(pg_admin_dsn, name))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(create())
    yield name
    asyncio.run(_drop_database(pg_admin_dsn, name))


async def _create_database(admin_dsn: str, prefix: str, options: str = "") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" {options}')
    finally:
        await admin.close()
    return name


async def _drop_database(admin_dsn: str, name: str) -> None:
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def dropped(pg_admin_dsn: str) -> Iterator[Callable[[str], None]]:
    """Drops the databases it is given, one after another in a thread of its own, while
    the next tests run (a DROP DATABASE waits 0.1-0.3 s for the disk); all of them
    before the session ends on a server of PULSE_TEST_DATABASE_URL, whereas the
    session's own (embedded) one goes with its data anyway."""
    names: queue.Queue[str | None] = queue.Queue()
    failed: list[str] = []

    def drop_them() -> None:
        while (name := names.get()) is not None:
            try:
                asyncio.run(_drop_database(pg_admin_dsn, name))
            except Exception as exc:  # said at the session's end
                failed.append(f"{name}: {exc!r}")

    thread = threading.Thread(target=drop_them, name="drop-databases", daemon=True)
    thread.start()
    yield names.put
    if not os.environ.get("PULSE_TEST_DATABASE_URL"):
        # What is still queued need not be dropped, nor the drop under way waited for
        # long. (Beside two CPU burners the last test's teardown, which waited for the
        # drops, timed out after 90 s.)
        with contextlib.suppress(queue.Empty):
            while True:
                names.get_nowait()
        names.put(None)
        thread.join(10)
        return
    names.put(None)
    thread.join()
    assert not failed, failed


@pytest.fixture
async def database_url(
    pg_admin_dsn: str, template_db: str, dropped: Callable[[str], None]
) -> AsyncIterator[str]:
    """A fresh database for this test, copied from the migrated template."""
    name = await _create_database(pg_admin_dsn, "pulse_test", f'TEMPLATE "{template_db}"')
    yield dsn_for(pg_admin_dsn, name)
    dropped(name)


@pytest.fixture
async def empty_database(pg_admin_dsn: str, dropped: Callable[[str], None]) -> AsyncIterator[str]:
    """A fresh database with nothing in it, not migrated."""
    name = await _create_database(pg_admin_dsn, "pulse_empty")
    yield dsn_for(pg_admin_dsn, name)
    dropped(name)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(database_url, max_size=10)
    yield p
    await p.close()


@pytest.fixture
def db(pool: asyncpg.Pool, database_url: str) -> Database:
    """The database seam over this test's pool (what Pulse's code takes)."""
    return Database(pool, database_url)


@pytest.fixture(scope="session")
def bus_url() -> Iterator[str | None]:
    """PULSE_TEST_BUS=1 runs the suite's in-process servers on NATS (PULSE_BUS_URL), with a
    nats-server for the session (each test's database has subjects of its own); CI runs
    the stream tests both ways. Unset: no NATS, today's LISTEN."""
    if os.environ.get("PULSE_TEST_BUS", "0") in ("0", ""):
        yield None
        return
    binary = nats_server_binary()
    assert binary is not None, NATS_MISSING
    port = free_port()
    proc = subprocess.Popen(
        [binary, "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(500):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.01)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def settings(database_url: str, tmp_path: Path, bus_url: str | None) -> Settings:
    return Settings(
        database_url=database_url,
        jwt_secret=TEST_SECRET,
        data_dir=tmp_path,
        direct_writes=direct_writes(),
        bus_url=bus_url,
    )


@pytest.fixture
def make_token() -> Callable[..., str]:
    def make(
        tenant_id: str | None = "t1", roles: tuple[str, ...] = ("customer",), **kw: Any
    ) -> str:
        return mint_token(TEST_SECRET, tenant_id=tenant_id, roles=roles, **kw)

    return make


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[str]:
    """A real Pulse server on a loopback port, in this test's event loop; yields its base URL."""
    async with running_server(settings) as url:
        yield url


@pytest.fixture
async def http(server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server, timeout=10) as client:
        yield client


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """`pulse.logs.configure_logging` (the CLI's main and the demo, run in-process by some
    tests) changes process-wide state: put it back after each test."""
    root = logging.getLogger()
    names = ["pulse", SERVER_LOGGER, ACCESS_LOGGER, *QUIET_LIBRARIES]
    levels = {name: logging.getLogger(name).level for name in names}
    root_level, handlers = root.level, root.handlers[:]
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(root_level)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def nats_binary() -> None:
    """Skips the test where nats-server is missing (CI installs it, and fails instead)."""
    if nats_server_binary() is None:
        if os.environ.get("CI"):
            pytest.fail(NATS_MISSING)
        pytest.skip(NATS_MISSING)


@pytest.fixture
async def nats_server(nats_binary: None) -> AsyncIterator[NatsServer]:
    """A nats-server of this test's own, started."""
    server = NatsServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# The slowest files, run first: with several workers (pyproject's addopts), one of
# them runs the soak while the others get through the rest, instead of the soak
# running alone at the end.
SLOW_FILES = ("tests/test_soak.py", "tests/test_bus_cluster.py", "tests/demo/test_readme.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every test that reaches PostgreSQL is marked `db`, so CI can rerun just
    # those against a second server.
    for item in items:
        if "pg_admin_dsn" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.db)
    slow = {name: rank for rank, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: slow.get(item.nodeid.split("::")[0], len(slow)))
