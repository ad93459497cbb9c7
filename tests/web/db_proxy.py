"""A TCP proxy in front of PostgreSQL that a test can cut, as a network partition would.

While cut, every connection through it is closed and new ones are closed as soon
as they are accepted, so the server under test sees its database go away (the
driver's connection errors, then refused reconnects) without the database
itself being touched; ``mend`` lets connections through again. ``freeze`` is a
database that stopped answering (SIGSTOPped, a machine gone): connections stay open,
new ones are accepted (the kernel's backlog), and nothing goes through either way
until ``thaw``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit, urlunsplit


class DatabaseProxy:
    def __init__(self, upstream_dsn: str) -> None:
        parts = urlsplit(upstream_dsn)
        query = parse_qs(parts.query)
        self._host = parts.hostname
        self._port = parts.port or 5432
        # Unix socket DSNs (the embedded server's) name the socket's folder in ?host=.
        self._socket_dir = None if self._host else query.get("host", [None])[0]
        self._upstream = parts
        self._cut = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self.dsn = ""

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        user = self._upstream.username or "postgres"
        password = f":{self._upstream.password}" if self._upstream.password else ""
        netloc = f"{user}{password}@127.0.0.1:{port}"
        self.dsn = urlunsplit(("postgresql", netloc, self._upstream.path, "", ""))

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def cut(self) -> None:
        self._cut = True
        for pipe in list(self._pipes):
            pipe.cancel()

    def mend(self) -> None:
        self._cut = False

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.close()
            return
        await self._flowing.wait()
        try:
            if self._socket_dir:
                path = f"{self._socket_dir}/.s.PGSQL.{self._port}"
                up_reader, up_writer = await asyncio.open_unix_connection(path)
            else:
                up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        except OSError:
            writer.close()
            return
        if self._cut:  # cut while this connection was being made
            for end in (writer, up_writer):
                end.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)  # type: ignore[arg-type]
        try:
            await asyncio.gather(
                _pump(reader, up_writer, self._flowing), _pump(up_reader, writer, self._flowing)
            )
        except asyncio.CancelledError:
            pass
        finally:
            self._pipes.discard(task)  # type: ignore[arg-type]
            for end in (writer, up_writer):
                end.close()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            await flowing.wait()
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def database_proxy(upstream_dsn: str) -> AsyncIterator[DatabaseProxy]:
    proxy = DatabaseProxy(upstream_dsn)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
