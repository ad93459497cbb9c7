"""The fan-out floor: Pulse's data path with nothing around it.

``python -m benchmarks.bare_fanout DSN TENANT PORT`` serves every connection the
same SSE response head, LISTENs to the tenant's channel, and on each
notification reads the new rows (Pulse's own query and encoding) and writes
them to every connected socket in one loop: no framework, no hub, no
subscription, no task per client. The fan-out scenarios run it beside Pulse, on
the same clients, so that what this machine's sockets cost per subscriber is
measured, not assumed.
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg
import uvloop

from pulse.bus.store import EventStore
from pulse.db.database import Database
from pulse.web.sse import sse_chunk as encode_events

# The head and a first chunk, as Pulse starts a stream (its client waits for the chunk).
HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    b"d\r\nretry: 2000\n\n\r\n"
)


class _Client(asyncio.Protocol):
    def __init__(self, clients: set[asyncio.Transport]) -> None:
        self.clients = clients
        self.head = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport in self.clients:
            return
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.transport.write(HEAD)
            self.clients.add(self.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.clients.discard(self.transport)  # type: ignore[arg-type]


async def main(dsn: str, tenant_id: str, port: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    store = EventStore(Database(pool, dsn))
    clients: set[asyncio.Transport] = set()
    server = await asyncio.get_running_loop().create_server(
        lambda: _Client(clients), "127.0.0.1", port, backlog=2048
    )
    delivered = await store.newest_id(tenant_id)
    dirty = asyncio.Event()
    listen = await asyncpg.connect(dsn)
    channel = await pool.fetchval("SELECT pulse_channel($1)", tenant_id)
    await listen.add_listener(channel, lambda *_: dirty.set())
    print("ready", flush=True)
    async with server:
        while True:
            await dirty.wait()
            dirty.clear()
            events = await store.events_after(tenant_id, delivered, limit=2000)
            if not events:
                continue
            delivered = events[-1].id
            data = encode_events(events, None)
            chunk = b"%x\r\n%b\r\n" % (len(data), data)
            for transport in clients:
                transport.write(chunk)


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
