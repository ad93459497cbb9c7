"""The HTTP API fuzzed from its own OpenAPI document (schemathesis), on a real server:
no generated request, valid or not, gets a 5xx, and every answer is one the document
gives for that operation (status, media type, body schema)."""

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
            "not_a_server_error,status_code_conformance,content_type_conformance,"
            "response_schema_conformance",
            # An event stream never ends: each call would only wait out the client's
            # timeout. Its parameters are tested in test_sse.py and test_openapi_answers.py.
            "--exclude-path",
            "/api/v1/customer/telemetry/stream/sse",
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
