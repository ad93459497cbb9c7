"""The one LISTEN connection of this process.

It is a dedicated connection, not one from the pool: a pool resets connections
with ``UNLISTEN *``. It listens only to channels somebody here wants, keeps
listening across reconnects, and tells the hub after every reconnect so that
the hub can backfill from the table what was committed meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson

from pulse.db.errors import CONNECTION_ERRORS, CONNECTION_ERRORS_OR_TIMEOUT, DatabaseUnavailable

log = logging.getLogger(__name__)

HEALTH_CHECK_S = 5.0
APPLICATION_NAME = "pulse-listener"  # shows in pg_stat_activity


class Listener:
    def __init__(
        self,
        dsn: str,
        *,
        on_notification: Callable[[dict[str, Any]], None],
        on_reconnect: Callable[[], None],
        backoff_max_s: float = 5.0,
        on_reconnected: Callable[[], None] = lambda: None,
    ) -> None:
        self._dsn = dsn
        self._on_notification = on_notification
        self._on_reconnect = on_reconnect
        self._on_reconnected = on_reconnected
        self._backoff_max_s = backoff_max_s
        self._wanted: set[str] = set()
        self._listening: set[str] = set()
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one command at a time on the connection
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self.reconnects = 0
        self._ever_connected = False
        self.last_notification_at: float | None = None

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    @property
    def channels(self) -> int:
        return len(self._listening)

    async def run(self) -> None:
        """Connect, listen, and reconnect for as long as the task lives."""
        attempt = 0
        try:
            while True:
                try:
                    await self._connect()
                except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                    # Refused, shutting down, not accepting connections...: all pass.
                    attempt += 1
                    delay = random.uniform(0, min(self._backoff_max_s, 0.1 * 2**attempt))
                    log.warning("listener cannot connect (%s); retrying in %.2f s", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                if self._ever_connected:
                    self.reconnects += 1
                    self._on_reconnected()
                    log.info("listener reconnected; backfilling %d channels", len(self._listening))
                self._ever_connected = True
                self._on_reconnect()
                await self._watch()
        finally:
            await self._close()

    async def _connect(self) -> None:
        conn = await asyncpg.connect(
            self._dsn, timeout=10, server_settings={"application_name": APPLICATION_NAME}
        )
        self._lost.clear()
        conn.add_termination_listener(lambda _c: self._lost.set())
        async with self._lock:
            self._conn = conn
            self._listening = set()
            for channel in sorted(self._wanted):
                await conn.add_listener(channel, self._deliver)
                self._listening.add(channel)
        self._up.set()

    async def _watch(self) -> None:
        """Return when the connection is lost; a periodic query catches silent deaths."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), HEALTH_CHECK_S)
                break
            except TimeoutError:
                pass
            try:
                async with self._lock:
                    assert self._conn is not None
                    await self._conn.fetchval("SELECT 1", timeout=HEALTH_CHECK_S)
            except CONNECTION_ERRORS_OR_TIMEOUT as exc:
                log.warning("listener health check failed: %s", exc)
                break
        log.warning("listener connection lost")
        await self._close()

    async def _close(self) -> None:
        self._up.clear()
        conn, self._conn = self._conn, None
        self._listening = set()
        if conn is not None:
            conn.terminate()

    def _deliver(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        # Called by asyncpg for each notification: must never block.
        self.last_notification_at = time.monotonic()
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.error("ignoring a notification that is not JSON: %.100r", payload)
            return
        if isinstance(message, dict):
            self._on_notification(message)

    async def listen(self, channel: str, timeout: float = 10.0) -> None:
        """Listen to ``channel`` from now on; waits until the connection is up."""
        self._wanted.add(channel)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the wait ends.
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            self._wanted.discard(channel)
            raise DatabaseUnavailable("the listener is not connected") from None
        async with self._lock:
            if (
                self._conn is not None
                and channel in self._wanted
                and channel not in self._listening
            ):
                try:
                    await self._conn.add_listener(channel, self._deliver)
                    self._listening.add(channel)
                except CONNECTION_ERRORS as exc:
                    # The reconnect will listen again; the caller's backfill covers the gap.
                    log.warning("LISTEN %s failed: %s", channel, exc)

    async def unlisten(self, channel: str) -> None:
        self._wanted.discard(channel)
        async with self._lock:
            if self._conn is not None and channel in self._listening:
                self._listening.discard(channel)
                try:
                    await self._conn.remove_listener(channel, self._deliver)
                except CONNECTION_ERRORS as exc:
                    log.warning("UNLISTEN %s failed: %s", channel, exc)
