"""A reconnect storm finds room in the listen queue.

After a restart every client reconnects at once. Connections the process has
not accepted yet wait in the kernel's listen queue; beyond its length their
SYN is dropped and the client retries only a second later (hypercorn's default
queue holds 100). Here the server process is stopped (SIGSTOP), so that it
accepts nothing, while 600 clients connect: the kernel completes every
handshake only if the queue has room for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import socket
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pulse.config import Settings
from pulse.serving import LISTEN_BACKLOG
from tests.support import pulse_serve

pytestmark = pytest.mark.timeout(60)

CLIENTS = 600


async def test_600_connections_complete_while_the_server_accepts_none(
    database_url: str, tmp_path: Path
) -> None:
    assert CLIENTS < LISTEN_BACKLOG
    async with pulse_serve(data_dir=tmp_path, database_url=database_url) as server:
        address = urlsplit(server.url)
        sockets = [socket.socket() for _ in range(CLIENTS)]
        server.proc.send_signal(signal.SIGSTOP)
        try:
            for sock in sockets:
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    sock.connect((address.hostname, address.port))
            # A completed handshake makes a socket writable; a dropped SYN is
            # retried after a second, so half a second tells them apart.
            await asyncio.sleep(0.5)
            _, writable, _ = select.select([], sockets, [], 0)
            connected = sum(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for s in writable)
        finally:
            server.proc.send_signal(signal.SIGCONT)
            for sock in sockets:
                sock.close()
        assert connected == CLIENTS


async def test_a_connection_whose_request_waits_is_still_answered(
    database_url: str, tmp_path: Path
) -> None:
    """In a reconnect storm a busy process may read a connection's request seconds
    after accepting it: hypercorn's default closed it, unanswered, after 5 s. The
    wait here stands for that delay; the server must answer after it."""
    assert Settings().http_idle_timeout_s > 6  # the default, which pulse_serve runs with
    async with pulse_serve(data_dir=tmp_path, database_url=database_url) as server:
        address = urlsplit(server.url)
        reader, writer = await asyncio.open_connection(address.hostname, address.port)
        try:
            await asyncio.sleep(6)  # the delay under test, not a wait for a condition
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
        assert status.startswith(b"HTTP/1.1 200"), status
