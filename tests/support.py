"""Helpers the tests share (not fixtures)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any
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
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn owns (and closes) the socket
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
    response: httpx.Response, *, comments: bool = False
) -> AsyncIterator[SSEEvent]:
    """Parse an SSE byte stream; `retry:` is skipped, comments too unless asked for
    (then each comes as an event named ``:``)."""
    event: str | None = None
    id_: str | None = None
    data: list[str] = []
    async for line in response.aiter_lines():
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
