"""The ingest a Python developer would write instead of Pulse: the benchmarks' baseline.

Starlette on uvicorn (with uvloop and httptools, as `uvicorn[standard]` installs),
asyncpg, one `executemany` in one transaction per request into a plain table whose
ids come from a BIGSERIAL, and a row trigger that NOTIFYs each row. No device
authentication, no rate limits, no per-tenant ordering of ids, no alert rules, no
device status: what users would otherwise run, and the yardstick the issue asks for.

    python -m benchmarks.typical --dsn postgresql://... --port 8100
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    id          bigserial PRIMARY KEY,
    tenant_id   text NOT NULL,
    device_id   text NOT NULL,
    device_time timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    metrics     jsonb NOT NULL
);
CREATE OR REPLACE FUNCTION readings_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('readings_' || NEW.tenant_id, NEW.id::text);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS readings_notify ON readings;
CREATE TRIGGER readings_notify AFTER INSERT ON readings
    FOR EACH ROW EXECUTE FUNCTION readings_notify();
"""

INSERT = "INSERT INTO readings (tenant_id, device_id, device_time, metrics) VALUES ($1, $2, $3, $4)"


def _row(tenant_id: str, device_id: str, message: dict[str, Any]) -> tuple[Any, ...]:
    ts = message.get("ts")
    when = datetime.fromisoformat(ts) if isinstance(ts, str) else datetime.now(UTC)
    return (tenant_id, device_id, when, orjson.dumps(message["metrics"]).decode())


def build_app(dsn: str) -> Starlette:
    pool: asyncpg.Pool | None = None

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        nonlocal pool
        pool = await asyncpg.create_pool(dsn, min_size=4, max_size=10)
        assert pool is not None
        await pool.execute(SCHEMA)
        yield
        await pool.close()

    async def telemetry(request: Request) -> Response:
        message = orjson.loads(await request.body())
        row = _row(request.path_params["tenant"], request.path_params["device"], message)
        assert pool is not None
        async with pool.acquire() as conn, conn.transaction():
            event_id = await conn.fetchval(INSERT + " RETURNING id", *row)
        return Response(orjson.dumps({"id": event_id}), 201, media_type="application/json")

    async def batch(request: Request) -> Response:
        messages = orjson.loads(await request.body())["messages"]
        rows = [_row(m["tenant_id"], m["device_id"], m) for m in messages]
        assert pool is not None
        async with pool.acquire() as conn, conn.transaction():
            await conn.executemany(INSERT, rows)
        body = {"accepted": len(rows), "rejected": 0}
        return Response(orjson.dumps(body), 200, media_type="application/json")

    return Starlette(
        routes=[
            Route(
                "/ingest/v1/tenant/{tenant}/device/{device}/telemetry", telemetry, methods=["POST"]
            ),
            Route("/ingest/v1/batch", batch, methods=["POST"]),
            Route("/readyz", lambda _: Response("ok"), methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.typical", description=__doc__)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.dsn),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
