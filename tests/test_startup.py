"""`pulse serve` that cannot start says why in one line, exits non-zero, and leaves
nothing running (issue #19 item 5, issue #22 items 2 and 3)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from quart import Quart

from pulse import serving
from pulse.config import Settings
from pulse.db.embedded import embedded_postgres
from pulse.db.pool import CONNECT_TIMEOUT_S, describe
from pulse.runtime import StartupError
from tests.support import TEST_SECRET, dsn_for, free_port

pytestmark = pytest.mark.timeout(120)


async def pulse(*args: str, env: dict[str, str]) -> tuple[int, list[str]]:
    """Run `pulse ...` to its end; its exit code and the lines it wrote to stderr."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DATABASE"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pulse",
        *args,
        env=child_env | env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, stderr.decode().splitlines()


def the_one_line(lines: list[str]) -> str:
    """The failure's line: the last one, and no traceback anywhere."""
    assert lines, "nothing said"
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    return lines[-1]


async def test_no_way_to_verify_tokens(database_url: str) -> None:
    # More connections than any open-files limit: its warning must not come first.
    env = {"DATABASE_URL": database_url, "PULSE_MAX_CONNECTIONS": str(10**7)}
    code, lines = await pulse("serve", "--port", str(free_port()), env=env)
    line = the_one_line(lines)
    assert code != 0 and len(lines) == 1, lines
    assert (
        line.startswith("pulse serve: ") and "PULSE_JWT_SECRET" in line and "PULSE_JWKS_URL" in line
    )


async def test_a_database_that_does_not_exist(pg_admin_dsn: str) -> None:
    missing = dsn_for(pg_admin_dsn, "pulse_no_such_database")
    env = {"DATABASE_URL": missing, "PULSE_JWT_SECRET": TEST_SECRET}
    code, lines = await pulse("serve", "--port", str(free_port()), env=env)
    assert code != 0
    assert '"pulse_no_such_database" does not exist' in the_one_line(lines)
    code, lines = await pulse("migrate", env=env)
    assert code != 0
    assert the_one_line(lines).startswith("pulse migrate: cannot use the database")


async def test_a_database_that_is_not_migrated(empty_database: str) -> None:
    env = {"DATABASE_URL": empty_database, "PULSE_JWT_SECRET": TEST_SECRET}
    code, lines = await pulse("serve", "--port", str(free_port()), env=env)
    assert code != 0
    line = the_one_line(lines)
    assert "is not migrated" in line and "run `pulse migrate`" in line
    # Credentials never appear in what is printed.
    assert "@" not in line


async def test_a_port_that_is_none(database_url: str) -> None:
    env = {"DATABASE_URL": database_url, "PULSE_JWT_SECRET": TEST_SECRET}
    code, lines = await pulse("serve", "--port", "99999", env=env)
    assert code != 0
    assert the_one_line(lines).endswith("argument --port: 99999 is not a TCP port (1 to 65535)")


@pytest.mark.parametrize(
    ("option", "value"), [("--port", "0"), ("--workers", "0"), ("--workers", "-1")]
)
async def test_a_serve_option_that_cannot_work_is_refused_not_ignored(
    database_url: str, option: str, value: str
) -> None:
    """From the operations audit: --workers 0 and -1 (and --port 0) were taken for not
    given, and the server ran with its default."""
    env = {"DATABASE_URL": database_url, "PULSE_JWT_SECRET": TEST_SECRET}
    code, lines = await pulse("serve", option, value, env=env)
    assert code == 2, lines
    assert f"argument {option}: {value} is not" in the_one_line(lines)


@pytest.mark.parametrize(
    ("args", "url", "says"),
    [
        # postgres://$U:$P@$H/$DB with the variables unset: asyncpg filled in a local
        # socket and the OS user's database, and migrate migrated that one.
        (("migrate",), "postgres://", "DATABASE_URL names no database"),
        (("migrate",), "postgres://alice:s3cr3t@127.0.0.1:port/db", "a port must be"),
        # A 78-line traceback ending in "Port out of range", as if PORT were wrong.
        (("serve",), "postgres://alice:s3cr3t@127.0.0.1:99999/db", "a port must"),
        (("migrate",), "postgres://alice:s3cr3t@[::1/db", "an IPv6 host must be in brackets"),
        # The password p@ss#w0rd was "cannot use the database ss/: [Errno -2] Name or ..."
        (("migrate",), "postgres://alice:p@Zq#W0rd@127.0.0.1/db", "has a '#' or an '@'"),
    ],
)
async def test_a_database_url_that_cannot_be_used_as_written_is_one_line_quoting_none_of_it(
    args: tuple[str, ...], url: str, says: str
) -> None:
    # Where libpq's variables would send a URL without host or database: a port nothing
    # listens on, so that a check that let the URL through could change no database.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        env = {
            "DATABASE_URL": url,
            "PULSE_JWT_SECRET": TEST_SECRET,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(closed.getsockname()[1]),
            "PGDATABASE": "",
            "PGSERVICE": "",
        }
        port = ("--port", str(free_port())) if args == ("serve",) else ()
        code, lines = await pulse(*args, *port, env=env)
    assert code != 0 and len(lines) == 1, lines
    line = the_one_line(lines)
    assert line.startswith("pulse: DATABASE_URL") and says in line, line
    assert not any(part in line for part in ("alice", "s3cr3t", "Zq", "W0rd", "127.0")), line


async def test_a_port_in_use(database_url: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        env = {"DATABASE_URL": database_url, "PULSE_JWT_SECRET": TEST_SECRET}
        code, lines = await pulse("serve", "--port", str(port), env=env)
    assert code != 0
    assert (
        the_one_line(lines)
        == f"pulse serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


async def test_a_failure_after_the_embedded_database_started_stops_it(tmp_path: Path) -> None:
    """A migration edited after it was applied: the embedded PostgreSQL had started, and
    must be stopped before the process exits (no server left behind, no traceback)."""
    env = {"PULSE_DATA_DIR": str(tmp_path), "PULSE_JWT_SECRET": TEST_SECRET}
    code, lines = await pulse("migrate", env=env)
    assert code == 0, lines
    with embedded_postgres(tmp_path) as dsn:
        conn = await asyncpg.connect(dsn)
        await conn.execute("UPDATE pulse_migrations SET checksum = 'edited' WHERE version = 1")
        await conn.close()
    code, lines = await pulse("serve", "--port", str(free_port()), env=env)
    assert code != 0
    assert "was edited after it was applied" in the_one_line(lines)
    assert not (tmp_path / "pgdata" / "postmaster.pid").exists(), "PostgreSQL still runs"


async def test_a_data_directory_that_cannot_be_used_is_one_line_naming_it(
    tmp_path: Path,
) -> None:
    """From the operations audit: PULSE_DATA_DIR on a file (or a folder it may not write)
    ended `pulse serve` in a 30-line traceback and `pulse migrate` in a bare one."""
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    env = {"PULSE_DATA_DIR": str(taken), "PULSE_JWT_SECRET": TEST_SECRET}
    for args in (
        ("serve", "--port", str(free_port())),
        ("serve", "--port", str(free_port()), "--workers", "2"),
        ("migrate",),
    ):
        code, lines = await pulse(*args, env=env)
        line = the_one_line(lines)
        assert code != 0, lines
        assert line.startswith(f"pulse {args[0]}: cannot use the "), line
        assert line.endswith(f"database in PULSE_DATA_DIR={taken}: File exists"), line


async def test_a_data_directory_postgresql_cannot_initialise_is_one_line_naming_it(
    tmp_path: Path,
) -> None:
    """From the operations audit: a file where the embedded server's data folder goes
    (PULSE_DATA_DIR/pgdata) ended in a 30-line traceback and initdb's command line,
    without the setting or the reason. One line now, naming both the setting and the
    log that holds initdb's own words."""
    (tmp_path / "pgdata").write_text("not a folder")
    env = {"PULSE_DATA_DIR": str(tmp_path), "PULSE_JWT_SECRET": TEST_SECRET}
    for args in (("serve", "--port", str(free_port())), ("migrate",)):
        code, lines = await pulse(*args, env=env)
        line = the_one_line(lines)
        assert code != 0, lines
        assert f"PULSE_DATA_DIR={tmp_path}: initdb failed" in line, line
        assert line.endswith(f"its output is in {tmp_path / 'pgserver.log'}"), line
    assert "Not a directory" in (tmp_path / "pgserver.log").read_text()


async def test_with_json_logs_the_reason_a_process_stops_is_a_json_line(
    database_url: str,
) -> None:
    """From the operations audit: with PULSE_LOG_FORMAT=json every runtime line was JSON,
    but the line saying why `pulse serve` or `pulse migrate` stopped was plain text,
    which a log shipper reading JSON drops: the one line needed at 3 a.m."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    cases = [
        (("serve",), {"PULSE_QUEUE_SIZE": "0"}, "pulse: PULSE_QUEUE_SIZE=0 must be a positive"),
        (
            ("serve", "--port", str(taken)),
            {"DATABASE_URL": database_url, "PULSE_JWT_SECRET": TEST_SECRET},
            f"pulse serve: cannot listen on 127.0.0.1:{taken}",
        ),
        (("migrate",), {"DATABASE_URL": database_url + "-missing"}, "pulse migrate: cannot use"),
    ]
    try:
        for args, env, said in cases:
            code, lines = await pulse(*args, env=env | {"PULSE_LOG_FORMAT": "json"})
            assert code == 1, lines
            records = [json.loads(line) for line in lines]  # every line, JSON
            assert records[-1]["level"] == "CRITICAL", records
            assert records[-1]["message"].startswith(said), records
    finally:
        busy.close()


@pytest.mark.parametrize("command", ["migrate", "serve"])
async def test_a_database_that_takes_the_connection_and_never_answers(command: str) -> None:
    """The operations audit, finding 5: a PostgreSQL SIGSTOPped (its kernel still takes
    connections) held `pulse migrate` 60 s, then said `cannot use the database
    host:port/db: ` with no reason; `pulse serve` ended after 60 s in hypercorn's
    LifespanTimeoutError traceback, which blames the ASGI lifespan protocol. Here a
    loopback socket that listens and never answers (nothing accepts it: the kernel
    completes the handshake). Now the connect gives up after CONNECT_TIMEOUT_S and both
    commands say so in one line naming the database, without its credentials."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        env = {
            "DATABASE_URL": f"postgresql://pulse:s3cret@127.0.0.1:{port}/pulse_db",
            "PULSE_JWT_SECRET": TEST_SECRET,
        }
        args = (command, "--port", str(free_port())) if command == "serve" else (command,)
        started = time.monotonic()
        code, lines = await pulse(*args, env=env)
        took = time.monotonic() - started
    line = the_one_line(lines)
    assert code == 1, lines
    assert line == (
        f"pulse {command}: cannot use the database 127.0.0.1:{port}/pulse_db: the server "
        f"accepted the connection but did not answer within {CONNECT_TIMEOUT_S:g} s "
        "(stopped, hung or overloaded, or not PostgreSQL)"
    ), lines
    assert "s3cret" not in "\n".join(lines)
    assert took < 20, took  # asyncpg's and hypercorn's 60 s before


async def test_an_app_that_does_not_start_in_time_is_one_line_not_a_traceback(
    settings: Settings,
) -> None:
    """Whatever holds the start past hypercorn's startup timeout (a service that
    answered the connection, then stopped answering), `pulse serve` says it in its one
    line (StartupError), not in hypercorn's traceback blaming the ASGI lifespan protocol."""
    app = Quart("stuck")

    @app.while_serving
    async def never() -> AsyncGenerator[None, None]:
        await asyncio.Event().wait()
        yield

    config = serving.hypercorn_config(settings, f"127.0.0.1:{free_port()}")
    config.startup_timeout = 0.5
    with pytest.raises(StartupError, match=r"^did not start within 0\.5 s: "):
        await asyncio.wait_for(serving.serve(app, config, asyncio.Event()), 30)


async def test_the_database_connect_timeout_is_pulse_db_connect_timeout_s() -> None:
    """Review R2: the 5 s was fixed; a database far away, or waking from scale-to-zero,
    needs more, and an operator may want less. A never-answering database as above,
    with PULSE_DB_CONNECT_TIMEOUT_S=2: `pulse migrate` gives up after about 2 s (and
    the look at the address, up to 1 s), in one line that says 2 s."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        env = {
            "DATABASE_URL": f"postgresql://pulse:s3cret@127.0.0.1:{port}/pulse_db",
            "PULSE_JWT_SECRET": TEST_SECRET,
            "PULSE_DB_CONNECT_TIMEOUT_S": "2",
        }
        started = time.monotonic()
        code, lines = await pulse("migrate", env=env)
        took = time.monotonic() - started
    line = the_one_line(lines)
    assert code == 1, lines
    assert line == (
        f"pulse migrate: cannot use the database 127.0.0.1:{port}/pulse_db: the server "
        "accepted the connection but did not answer within 2 s "
        "(stopped, hung or overloaded, or not PostgreSQL)"
    ), lines
    assert "s3cret" not in "\n".join(lines)
    assert 2 <= took < CONNECT_TIMEOUT_S, took  # the process's start included


@contextlib.asynccontextmanager
async def a_role_of_no_privilege(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A login role (named ``pulse_np_...``) owning nothing, granted nothing."""
    role = f"pulse_np_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        yield role
    finally:
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()


def as_role(dsn: str, role: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{role}@{parts.netloc.rpartition('@')[2]}"))


async def test_a_role_without_the_privileges_is_one_line_naming_the_database(
    pg_admin_dsn: str, empty_database: str, database_url: str
) -> None:
    """From the operations audit (migrate_priv.log): `pulse migrate` as a role without
    CREATE on schema public (PostgreSQL 15's default for a role that does not own the
    database) printed a 27-line traceback ending `InsufficientPrivilegeError`, naming no
    database; `pulse serve` as a role without SELECT on pulse_migrations logged `ERROR
    pulse: Exception` and a traceback before its line. One line each now, naming the
    database and what to do."""
    async with a_role_of_no_privilege(pg_admin_dsn) as role:
        owner = await asyncpg.connect(empty_database)
        try:  # as PostgreSQL 15 and later have it
            await owner.execute("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
        finally:
            await owner.close()
        env = {"DATABASE_URL": as_role(empty_database, role), "PULSE_JWT_SECRET": TEST_SECRET}
        code, lines = await pulse("migrate", env=env)
        line = the_one_line(lines)
        assert code == 1 and len(lines) == 1, lines
        where = describe(empty_database)
        assert line.startswith(f"pulse migrate: cannot use the database {where}: "), line
        assert "permission denied for schema public (InsufficientPrivilegeError)" in line
        assert "run `pulse migrate` as the database's owner" in line

        env["DATABASE_URL"] = as_role(database_url, role)
        code, lines = await pulse("serve", "--port", str(free_port()), env=env)
        line = the_one_line(lines)
        assert code == 1 and not any(" ERROR " in said for said in lines), lines
        where = describe(database_url)
        assert line.startswith(f"pulse serve: cannot use the database {where}: "), line
        assert "permission denied for table pulse_migrations (InsufficientPrivilegeError)" in line
        assert "serve as the role that ran `pulse migrate`, or as a member of it" in line


async def test_a_role_granted_the_tables_but_not_their_days_is_refused_at_start(
    pg_admin_dsn: str, database_url: str
) -> None:
    """From the operations review of 8 December: served as a role granted SELECT,
    INSERT, UPDATE and DELETE on the tables (as docs/operations.md advised), Pulse could
    neither make telemetry's daily partitions nor drop them; it served while the days
    the owner's last run had made lasted, then answered every reading 503 while /readyz
    said ready, and refused to restart with advice the role already followed. Refused
    at once now, saying what PostgreSQL needs."""
    async with a_role_of_no_privilege(pg_admin_dsn) as role:
        owner = await asyncpg.connect(database_url)
        try:
            await owner.execute(
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "{role}";'
                f'GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO "{role}"'
            )
            owner_name = await owner.fetchval("SELECT current_user")
            env = {"DATABASE_URL": as_role(database_url, role), "PULSE_JWT_SECRET": TEST_SECRET}
            code, lines = await pulse("serve", "--port", str(free_port()), env=env)
            line = the_one_line(lines)
            assert code == 1 and not any(" ERROR " in said for said in lines), lines
            assert line == (
                f"pulse serve: cannot use the database {describe(database_url)}: role {role} "
                "may not make or drop telemetry's daily partitions, which PostgreSQL lets only "
                f"its owner ({owner_name}) and the owner's members do: serve as {owner_name}, "
                f"the role that ran `pulse migrate`, or GRANT {owner_name} TO {role}; grants "
                "on the tables are not enough"
            ), line
            # As the advice says: a member of the owner serves.
            await owner.execute(f'GRANT "{owner_name}" TO "{role}"')
            port = free_port()
            serving = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pulse", "serve", "--port", str(port),
                env={**os.environ, **env}, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            try:
                assert serving.stderr is not None
                async with asyncio.timeout(60):
                    while b"Running on" not in (said := await serving.stderr.readline()):
                        assert said, "it stopped"
            finally:
                serving.terminate()
                await serving.wait()
            await owner.execute(f'REVOKE "{owner_name}" FROM "{role}"')
        finally:
            await owner.execute(f'DROP OWNED BY "{role}"')
            await owner.close()


async def test_an_owner_of_telemetry_without_create_on_the_schema_is_told_so(
    pg_admin_dsn: str, database_url: str
) -> None:
    """Review 4 of 8 December: an owner of telemetry without CREATE on the schema was
    told "GRANT O TO O": what it lacks is CREATE, where the days are made."""
    async with a_role_of_no_privilege(pg_admin_dsn) as role:
        owner = await asyncpg.connect(database_url)
        try:
            await owner.execute(
                f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}";'
                f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}";'
                f'ALTER TABLE telemetry OWNER TO "{role}";'
                "REVOKE CREATE ON SCHEMA public FROM PUBLIC"
            )
            env = {"DATABASE_URL": as_role(database_url, role), "PULSE_JWT_SECRET": TEST_SECRET}
            code, lines = await pulse("serve", "--port", str(free_port()), env=env)
            assert code == 1, lines
            assert the_one_line(lines) == (
                f"pulse serve: cannot use the database {describe(database_url)}: role {role} "
                "may not create tables in schema public, where telemetry's daily partitions "
                f"are made: GRANT CREATE ON SCHEMA public TO {role}"
            ), lines
        finally:
            await owner.execute(f'DROP OWNED BY "{role}"')
            await owner.close()


async def test_a_database_migrated_by_a_newer_release_is_said_once_and_served(
    database_url: str,
) -> None:
    """From the upgrade audit: a release started against a database that a newer one
    migrated (a rollback of the code) started and said nothing, its check looking only
    at the migrations it knows; a release from before 0009 then answered history with
    500s. Now `pulse serve` and `pulse migrate` name the migrations they do not know in
    one warning, and go on (docs/operations.md, Rolling back)."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO pulse_migrations (version, name, checksum) VALUES "
            "(9998, '9998_from_a_newer_release.sql', 'x'), (9999, '9999_and_another.sql', 'y')"
        )
    finally:
        await conn.close()
    where = describe(database_url)
    env = {"DATABASE_URL": database_url, "PULSE_JWT_SECRET": TEST_SECRET}
    code, lines = await pulse("migrate", env=env)
    assert code == 0, lines
    warned = [line for line in lines if "migrated by a newer release" in line]
    assert len(warned) == 1, lines
    assert f"the database {where} " in warned[0] and " WARNING " in warned[0]
    assert "9998_from_a_newer_release.sql, 9999_and_another.sql" in warned[0]

    said = await said_serving(env)
    warned = [line for line in said if "migrated by a newer release" in line]
    assert len(warned) == 1, said
    assert f"the database {where} " in warned[0] and "9998_from_a_newer_release.sql" in warned[0]


async def said_serving(env: dict[str, str], workers: int = 1) -> list[str]:
    """What `pulse serve` logs up to serving, every worker of ``workers`` (then it is
    stopped)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("PULSE_", "DATABASE"))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pulse",
        "serve",
        "--port",
        str(free_port()),
        "--workers",
        str(workers),
        env=child_env | env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    said: list[str] = []
    try:
        async with asyncio.timeout(60 * workers):
            while sum("Running on http" in line for line in said) < workers:
                line = (await proc.stderr.readline()).decode()
                assert line, said  # it stopped
                said.append(line.rstrip())
    finally:
        proc.terminate()
        await proc.wait()
    return said


async def test_a_database_that_autovacuum_does_not_clean_is_said_at_startup(
    database_url: str, pg_admin_dsn: str
) -> None:
    """From the soak audit: the machine's PostgreSQL had autovacuum off, and in 32
    minutes 5 tenant rows had 842 dead versions, the rollups 144,000, and nothing said
    so. Pulse's writes update rows in place and need autovacuum: `pulse serve` now says,
    in one warning, what keeps it from Pulse's tables (a table's autovacuum_enabled off,
    or track_counts off, without which autovacuum has nothing to go by), and serves."""
    env = {"DATABASE_URL": database_url, "PULSE_JWT_SECRET": TEST_SECRET}
    admin = await asyncpg.connect(pg_admin_dsn)
    try:  # the test's server may have it off (this machine's PostgreSQL does)
        server_off = not await admin.fetchval("SELECT current_setting('autovacuum')::bool")
    finally:
        await admin.close()
    warned = [line for line in await said_serving(env) if "not vacuumed" in line]
    assert len(warned) == server_off, warned
    if server_off:
        assert "(the server has autovacuum = off)" in warned[0]

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("ALTER TABLE tenants SET (autovacuum_enabled = off)")
        await conn.execute("ALTER TABLE devices SET (autovacuum_enabled = false)")
    finally:
        await conn.close()
    warned = [line for line in await said_serving(env) if "not vacuumed" in line]
    assert len(warned) == 1, warned
    assert f"the database {describe(database_url)} " in warned[0] and " WARNING " in warned[0]
    assert "autovacuum_enabled is off for devices, tenants)" in warned[0]

    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_admin_dsn)
    try:  # a setting of the server's, made here for this database's sessions only
        await admin.execute(f'ALTER DATABASE "{name}" SET track_counts = off')
    finally:
        await admin.close()
    warned = [line for line in await said_serving(env) if "not vacuumed" in line]
    assert len(warned) == 1, warned
    assert "track_counts = off" in warned[0]


async def test_with_workers_what_is_true_of_the_database_is_said_by_one_of_them(
    database_url: str,
) -> None:
    """From the last session's note: under `pulse serve --workers 3` each worker found the
    database migrated by a newer release and not vacuumed, and said so: three copies of
    each warning at every start, as if three problems. The first worker says them now,
    once each; the others serve as before."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO pulse_migrations (version, name, checksum) VALUES "
            "(9998, '9998_from_a_newer_release.sql', 'x')"
        )
        await conn.execute("ALTER TABLE tenants SET (autovacuum_enabled = off)")
    finally:
        await conn.close()
    env = {"DATABASE_URL": database_url, "PULSE_JWT_SECRET": TEST_SECRET}
    said = await said_serving(env, workers=3)
    for warning in ("migrated by a newer release", "not vacuumed"):
        warned = [line for line in said if warning in line]
        assert len(warned) == 1, said
        assert " WARNING [" in warned[0]  # with the pid of the worker that said it
    assert sum("Running on http" in line for line in said) == 3, said


async def test_with_workers_the_reason_a_worker_stops_is_a_log_line_with_its_pid() -> None:
    """From the operations audit: under --workers each worker that could not start said
    `pulse serve: cannot use the database ...` as a bare line, between the supervisor's
    lines that carry the time, the level and a pid: which worker, and when, was lost.
    Each such line is now a log line like the others, CRITICAL, with its worker's pid."""
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    env = {
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/pulse_db",
        "PULSE_JWT_SECRET": TEST_SECRET,
    }
    code, lines = await pulse("serve", "--port", str(free_port()), "--workers", "2", env=env)
    assert code == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    logged = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (\w+) \[(\d+)\] ")
    assert all(logged.match(line) for line in lines), lines
    reasons = [line for line in lines if "pulse serve: cannot use the database" in line]
    assert reasons, lines
    supervisor = {m[2] for line in lines if (m := logged.match(line)) and "worker" in line}
    for line in reasons:
        level, pid = logged.match(line).groups()  # type: ignore[union-attr]
        assert level == "CRITICAL" and pid not in supervisor, line


async def test_workers_beyond_the_ceiling_are_refused_on_the_command_line_too() -> None:
    """From the operations review of 8 December: PULSE_WORKERS=1025 was refused, but
    `--workers 5000` forked 5000 processes, each with its pool."""
    code, lines = await pulse("serve", "--workers", "1025", env={})
    assert code == 2, lines
    assert lines[-1].endswith("argument --workers: 1025 is more than 1,024 processes"), lines
    code, lines = await pulse("serve", env={"PULSE_WORKERS": "1025"})
    assert (code, lines[-1]) == (1, "pulse: PULSE_WORKERS=1025 must be at most 1,024 (processes)")


async def test_keys_fetched_over_plain_http_are_warned_of(database_url: str) -> None:
    """From the same review: PULSE_JWKS_URL=http://... was taken without a word, and whoever
    can change the keys on the way can forge any token, an operator's included."""
    env = {"DATABASE_URL": database_url + "-missing", "PULSE_JWKS_URL": "http://idp.test/jwks"}
    code, lines = await pulse("serve", "--port", str(free_port()), env=env)
    assert code == 1, lines  # the database is missing: it stops after the warning
    [warning] = [line for line in lines if "PULSE_JWKS_URL" in line]
    assert "WARNING" in warning and "can forge any token" in warning, warning
    env["PULSE_JWKS_URL"] = "https://idp.test/jwks"
    code, lines = await pulse("serve", "--port", str(free_port()), env=env)
    assert not [line for line in lines if "PULSE_JWKS_URL" in line], lines
