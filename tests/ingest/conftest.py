from __future__ import annotations

import asyncpg
import pytest

from tests.support import provision_device


@pytest.fixture
async def token(pool: asyncpg.Pool) -> str:
    """The provision token of device dev-1 of tenant t1."""
    return await provision_device(pool, "t1", "dev-1")


async def stored_rows(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM telemetry"))
