"""A database of its own, empty (no migration), for the migration tests."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from pulse.db.pool import connect
from tests.support import dsn_for


@pytest.fixture
async def conn(pg_admin_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    name = f"pulse_part_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    c = await connect(dsn_for(pg_admin_dsn, name))
    yield c
    await c.close()
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()
