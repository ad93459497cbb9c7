"""The HTTP API fuzzed from its own OpenAPI document (schemathesis), on a real server:
no generated request, valid or not, gets a 5xx."""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import asyncpg
import pytest

from pulse.auth.dev_tokens import mint_token
from tests.support import TEST_SECRET, provision_device, pulse_serve

pytestmark = pytest.mark.timeout(240)


@pytest.mark.skipif(
    shutil.which("st", path=str(Path(sys.executable).parent)) is None,
    reason="schemathesis is not installed",
)
async def test_no_server_errors(database_url: str, pool: asyncpg.Pool, tmp_path: Path) -> None:
    await provision_device(pool, "t1", "dev-1")
    admin = mint_token(TEST_SECRET, tenant_id="t1", roles=["tenant-admin"], lifetime_s=3600)
    st = str(Path(sys.executable).parent / "st")
    async with pulse_serve(data_dir=tmp_path, database_url=database_url) as server:
        proc = await asyncio.create_subprocess_exec(
            st,
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {admin}",
            "--phases",
            "coverage,fuzzing",
            "--max-examples",
            "5",
            "--seed",
            "20261127",
            "--no-color",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=tmp_path,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 200)
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-4000:]
    assert " passed" in report
    # The server, now stopped, logged no unhandled error either.
    assert "Traceback" not in server.stderr.decode(errors="replace")
