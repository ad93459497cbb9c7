"""hypercorn's idle timeout of a connection as a timer, not a task.

hypercorn 0.18 closes a connection that has sent no request for
``keep_alive_timeout`` (``PULSE_HTTP_IDLE_TIMEOUT_S``), also before its first:
each connection runs a task that waits for that long (or for the server's
termination), cancelled and awaited when a request comes and started again when
the response is done. That is a task, a ``wait_for`` and a cancellation per
request and per connection: in a reconnect storm of 10,000 clients, about a fifth
of the server's CPU per connect (docs/performance.md).

``IdleTimer`` keeps hypercorn's ``restart``/``stop`` interface and its meaning
with a timer handle: when the timer fires, the connection is closed as
hypercorn closes it (``_initiate_server_close``, shielded, in the connection's
task group). The server's termination closes every idle connection at once, as
hypercorn's tasks did, through one waiter per worker instead of one per
connection.

A connection's first request has a shorter limit, ``first_request_timeout``
(``PULSE_HTTP_FIRST_REQUEST_TIMEOUT_S``, 10 s), put on hypercorn's config under
``FIRST_REQUEST_TIMEOUT``: a connection that has sent no byte by then is closed
(clients that connect and never speak held every descriptor of a process for
the 30 s of the idle timeout). One that has sent something keeps the idle
timeout: a process busy with a reconnect storm may read a request seconds after
it came (docs/operations.md), and that delay is the server's, not the client's.
Whether anything came is the kernel's count of the bytes received on the
connection (Linux's ``TCP_INFO``), which includes what no one has read yet;
where it cannot be asked, the idle timeout applies.

Each connection gets one IdleTimer, so they count the connections made
(``connections_made``): the garbage collector's watch puts a full collection off while
connections arrive (``pulse.serving.collector``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import socket
import struct
import termios
import weakref
from typing import Any

# The attribute of hypercorn's Config with the limit for a connection's first request
# (pulse.serving.hypercorn_config sets it; absent, the idle timeout applies).
FIRST_REQUEST_TIMEOUT = "pulse_first_request_timeout"
# struct tcp_info (linux/tcp.h): tcpi_bytes_received, since Linux 4.1.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_BYTES_RECEIVED = struct.Struct("=Q")
_BYTES_RECEIVED_AT = 128
_INT = struct.Struct("i")

# The idle connections of each worker, closed at once when it terminates.
_idle: weakref.WeakKeyDictionary[Any, set[IdleTimer]] = weakref.WeakKeyDictionary()
_waiters: set[asyncio.Task[None]] = set()


class IdleTimer:
    """One connection's idle timeout (hypercorn's ``AsyncioSingleTask`` for it)."""

    __slots__ = ("_closing", "_group", "_handle", "_server")
    made = 0  # since the process started: one per connection

    def __init__(self) -> None:
        IdleTimer.made += 1
        self._server: Any = None  # hypercorn's TCPServer, known from the first restart
        self._handle: asyncio.TimerHandle | None = None
        self._group: Any = None
        self._closing: asyncio.Task[None] | None = None

    async def restart(self, task_group: Any, action: Any) -> None:
        """The connection is idle from now. ``action`` is the TCPServer's
        ``_idle_timeout``, which this replaces: it names the connection."""
        await self.stop()
        first = self._server is None  # hypercorn's first restart: the connection is new
        server = self._server = action.__self__
        self._group = task_group
        if server.context.terminated.is_set():
            self._expire()
            return
        loop = asyncio.get_running_loop()
        timeout = server.config.keep_alive_timeout
        first_timeout = getattr(server.config, FIRST_REQUEST_TIMEOUT, None) if first else None
        if first_timeout is not None and first_timeout < timeout:
            self._handle = loop.call_later(
                first_timeout, self._first_expired, timeout - first_timeout
            )
        else:
            self._handle = loop.call_later(timeout, self._expire)
        _watch(server.context, loop).add(self)

    async def stop(self) -> None:
        """A request came, or the connection closes: no timeout, and a close that had
        begun is cancelled (its shielded part goes on, as with hypercorn's task)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            _idle.get(self._server.context, set()).discard(self)
        closing, self._closing = self._closing, None
        if closing is not None and not closing.done():
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing

    def _first_expired(self, rest: float) -> None:
        """The first request's limit is up: closed if the client sent nothing, else the
        rest of the idle timeout."""
        if _sent_anything(self._server):
            self._handle = asyncio.get_running_loop().call_later(rest, self._expire)
        else:
            self._expire()

    def _expire(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        _idle.get(self._server.context, set()).discard(self)
        closing = self._close()
        try:
            self._closing = self._group._task_group.create_task(closing)
        except RuntimeError:  # its task group is ending, and with it the connection
            closing.close()

    async def _close(self) -> None:
        await asyncio.shield(self._server._initiate_server_close())


def _sent_anything(server: Any) -> bool:
    """Whether the client of hypercorn's TCPServer ``server`` has sent any byte, read or
    not (True where the kernel cannot be asked)."""
    sock = server.writer.get_extra_info("socket")
    if _TCP_INFO is None or sock is None:
        return True
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 256)
    except (OSError, ValueError):  # not TCP, or closed already
        return True
    if len(info) < _BYTES_RECEIVED_AT + _BYTES_RECEIVED.size:
        return True
    received: int = _BYTES_RECEIVED.unpack_from(info, _BYTES_RECEIVED_AT)[0]
    return received > 0 or _unread(sock) != 0


def _unread(sock: Any) -> int:
    """The bytes waiting in ``sock``'s receive queue (-1 where it cannot be asked): for a
    kernel that answers TCP_INFO without filling its bytes received (gVisor), so that a
    request waiting to be read is never taken for silence."""
    try:
        return int(_INT.unpack(fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])
    except (OSError, ValueError):
        return -1


def _watch(context: Any, loop: asyncio.AbstractEventLoop) -> set[IdleTimer]:
    """The idle connections of a worker; the first one starts its termination waiter."""
    idle = _idle.get(context)
    if idle is None:
        idle = _idle[context] = set()

        async def close_all_when_terminated() -> None:
            await context.terminated.wait()
            for timer in list(idle):
                timer._expire()

        waiter = loop.create_task(close_all_when_terminated())
        _waiters.add(waiter)
        waiter.add_done_callback(_waiters.discard)
    return idle


def connections_made() -> int:
    """hypercorn's connections since the process started (0 without the tuning)."""
    return IdleTimer.made


def time_idle_connections() -> None:
    """Give each of hypercorn's connections an IdleTimer instead of its task (once): the
    TCPServer makes its ``idle_task`` from this module global, and nothing else does."""
    from hypercorn.asyncio import tcp_server

    tcp_server.AsyncioSingleTask = IdleTimer  # type: ignore[attr-defined, assignment]
