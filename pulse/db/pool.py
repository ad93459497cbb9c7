"""The connection pool and the codecs every connection shares."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson


def _encode_json(value: Any) -> bytes:
    return orjson.dumps(value)


def _encode_jsonb(value: Any) -> bytes:
    return b"\x01" + orjson.dumps(value)  # jsonb's binary format: a version byte, then text


def _decode_jsonb(data: bytes) -> Any:
    return orjson.loads(data[1:])


# Every connection of Pulse asks for TCP keepalives of seconds (5 s idle, then 3
# probes 1 s apart), not the kernel's two hours: a connection whose process's machine
# vanished is closed by PostgreSQL within about 8 s, with the locks it held (a lead,
# or a tenant's row in the middle of a write). Unix sockets have none: there the two
# are on one machine.
KEEPALIVES = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "1",
    "tcp_keepalives_count": "3",
}
# A pooled connection left idle inside a transaction for this long is ended by
# PostgreSQL: its process is stopped or hung mid-write, holding a tenant's row that
# every process's writes of that tenant queue behind (a write sends its statements
# back to back). A transaction that waits on its client on purpose (an export's
# cursor) lifts it for itself (``pulse.history.reads``).
IDLE_IN_WRITE_S = 15


async def init_connection(conn: asyncpg.Connection) -> None:
    # No JIT: Pulse's statements are short, and a server PostgreSQL built with LLVM
    # compiles any whose estimate passes jit_above_cost. The rollups' statement is
    # estimated at 100 rows per jsonb_each_text call: on PostgreSQL 15 with JIT, a pass
    # over 10,000 rows took 450 ms instead of 50 (400 ms of it compiling) whenever
    # it was planned for its parameters: the first five passes on each connection.
    await conn.execute("SET jit = off")
    # Binary: orjson's bytes go to the wire as they are, with no str in between (a
    # 500-reading write is a 60 kB parameter; text format decoded it to str and
    # asyncpg encoded it back).
    await conn.set_type_codec(
        "jsonb",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        schema="pg_catalog",
        format="binary",
    )
    await conn.set_type_codec(
        "json", encoder=_encode_json, decoder=orjson.loads, schema="pg_catalog", format="binary"
    )


async def keep_session(conn: asyncpg.Connection) -> None:
    """What a connection goes through when it returns to the pool: nothing more than
    asyncpg's own bookkeeping (an open transaction is still rolled back).

    asyncpg's default sends ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`` at every release: a round trip, and 4% of the server's CPU in batch
    ingest. Pulse leaves no session state on a pooled connection: LISTEN, SET and
    session advisory locks live on dedicated connections (``Database.dedicated``), and
    ``migrate`` unlocks its own lock. tests/db/test_pool.py checks that a released
    connection's last statement is the caller's.
    """


POOL_NAME = "pulse"
# How long connecting may take, up to the first answer of the server (asyncpg's
# default is 60 s: a server that accepts connections but answers nothing, SIGSTOPped
# or wedged, held `pulse migrate` and `pulse serve` for a minute and then failed
# without saying it was the database). Below the 10 s within which a worker of
# `serve --workers` that fails as it starts stops the instance (pulse.serving.workers).
CONNECT_TIMEOUT_S = 5.0


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init_connection,
        reset=keep_session,
        command_timeout=60,
        timeout=CONNECT_TIMEOUT_S,
        # Named in pg_stat_activity beside "pulse listener", "pulse rollups", "pulse
        # sweeper"; an application_name in DATABASE_URL is the operator's, and stays.
        server_settings={
            **KEEPALIVES,
            "idle_in_transaction_session_timeout": f"{IDLE_IN_WRITE_S}s",
            **({} if "application_name=" in dsn else {"application_name": POOL_NAME}),
        },
    )
    assert pool is not None
    return pool


async def connect(dsn: str, **options: Any) -> asyncpg.Connection:
    """One connection outside any pool, with the pool's codecs; ``options`` go to asyncpg."""
    conn = await asyncpg.connect(dsn, **{"timeout": CONNECT_TIMEOUT_S, **options})
    await init_connection(conn)
    return conn
