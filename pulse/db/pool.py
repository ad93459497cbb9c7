"""The connection pool and the codecs every connection shares."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

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
# How long connecting may take, up to the first answer of the server: TCP, TLS, the
# startup and the authentication (SCRAM), about six round trips
# (PULSE_DB_CONNECT_TIMEOUT_S). asyncpg's default is 60 s: a server that accepts
# connections but answers nothing, SIGSTOPped or wedged, held `pulse migrate` and
# `pulse serve` for a minute and then failed without saying it was the database.
# asyncpg ignores connect_timeout in DATABASE_URL. The connection's set-up
# (``init_connection``, about five more round trips) has as long again, apart.
CONNECT_TIMEOUT_S = 5.0


class ConnectTimeout(TimeoutError):
    """A connection to the database not made (or not set up) within its time: said with
    the database's host:port/database, never its credentials. A TimeoutError, as
    asyncpg's own, so that every caller that handles one handles it; its words say it
    was the connection, not a statement, that timed out."""

    def __init__(self, message: str, *, answered: bool) -> None:
        super().__init__(message)
        self.answered = answered  # the server answered: it was the set-up that took long


def describe(dsn: str) -> str:
    """host:port/database of a connection URL, never its user or password: an IPv6
    host in brackets, a Unix socket's folder (``?host=/run/postgresql``) as the host,
    several hosts (``h1:5432,h2``) as written. Read as asyncpg reads it; never raises
    (it names the database in errors, and after `pulse migrate` has applied)."""
    try:
        parts = urlsplit(dsn)
        query = parse_qs(parts.query)
    except ValueError:
        return "the database"
    hostspec = parts.netloc.rpartition("@")[2]
    hosts = []
    for spec in hostspec.split(",") if hostspec else []:
        if spec.startswith("["):
            name, _, rest = spec[1:].partition("]")
            name, port = f"[{name}]", rest[1:] if rest.startswith(":") else ""
        else:
            name, _, port = spec.partition(":")
            name = unquote(name)
            if ":" in name:
                name = f"[{name}]"
        hosts.append(name + (f":{port}" if port else ""))
    if not hosts:
        name = query.get("host", ["localhost"])[0]
        port = query.get("port", [""])[0]
        hosts.append(name + (f":{port}" if port else ""))
    return f"{','.join(hosts)}{parts.path or '/'}"


async def _connected(dsn: str, timeout: float, connect: Any, *args: Any, **kwargs: Any) -> Any:
    """``connect(*args, **kwargs)`` within ``timeout``; its TimeoutError a ConnectTimeout."""
    try:
        return await connect(*args, timeout=timeout, **kwargs)
    except TimeoutError as exc:
        if isinstance(exc, ConnectTimeout):
            raise
        raise ConnectTimeout(
            f"no connection to {describe(dsn)} within {timeout:g} s", answered=False
        ) from exc


async def _set_up(dsn: str, timeout: float, conn: asyncpg.Connection) -> None:
    """``init_connection`` within ``timeout``, apart from the connect's."""
    try:
        async with asyncio.timeout(timeout):
            await init_connection(conn)
    except TimeoutError as exc:
        raise ConnectTimeout(
            f"the connection to {describe(dsn)} was made but not set up within {timeout:g} s",
            answered=True,
        ) from exc


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> asyncpg.Pool:
    """The pool; each of its connections (at the start, and each reconnect while
    serving) is made within ``connect_timeout`` and set up within as long again, else
    ConnectTimeout."""

    async def connect(*args: Any, **kwargs: Any) -> Any:
        kwargs.pop("timeout", None)
        return await _connected(dsn, connect_timeout, asyncpg.connect, *args, **kwargs)

    async def init(conn: asyncpg.Connection) -> None:
        await _set_up(dsn, connect_timeout, conn)

    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=init,
        reset=keep_session,
        command_timeout=60,
        connect=connect,
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
    timeout = options.pop("timeout", CONNECT_TIMEOUT_S)
    conn = await _connected(dsn, timeout, asyncpg.connect, dsn, **options)
    try:
        await _set_up(dsn, timeout, conn)
    except BaseException:
        conn.terminate()
        raise
    return conn
