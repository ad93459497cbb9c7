"""Helpers the tests share (not fixtures)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from pulse.auth.device_tokens import new_device_token
from pulse.config import Settings

TEST_SECRET = "test-secret-please-change-0123456789"


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
async def running_server(settings: Settings) -> AsyncIterator[str]:
    """Serve create_app(settings) with hypercorn on a free loopback port until the block ends."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from pulse.app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.graceful_timeout = 2
    stop = asyncio.Event()
    app = create_app(settings)
    task = asyncio.create_task(serve(app, config, shutdown_trigger=stop.wait))  # type: ignore[arg-type]
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(200):
                if task.done():
                    task.result()
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError("server did not start")
        yield url
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        sock.close()
