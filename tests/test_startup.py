"""`pulse serve` that cannot start says why in one line, exits non-zero, and leaves
nothing running (issue #19 item 5, issue #22 items 2 and 3)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import asyncpg
import pytest

from pulse.db.embedded import embedded_postgres
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
    env = {"DATABASE_URL": database_url, "PULSE_MAX_CONNECTIONS": str(10**9)}
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
    assert the_one_line(lines) == "pulse serve: cannot listen on 127.0.0.1:99999: not a TCP port"


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
