"""The LISTEN event source: PostgreSQL's notifications, on one connection per process.

It is a dedicated connection, not one from the pool: a pool resets connections
with ``UNLISTEN *``. It listens only to the channels of tenants somebody here
watches, keeps listening across reconnects, and calls ``resync`` after every
(re)connect so that the hub backfills from the table what was committed
meanwhile. Channel names come from SQL (``pulse_channel``), the one place that
derives them, and each tenant's is asked once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

import asyncpg
import orjson

from pulse.bus.source import Wakeups
from pulse.db.database import Database, translated
from pulse.db.errors import DatabaseUnavailable
from pulse.db.queries import load_queries
from pulse.logs import Throttled

log = logging.getLogger(__name__)
Q = load_queries(__package__)

HEALTH_CHECK_S = 5.0
# Shows in pg_stat_activity, so that operators can count listeners: with NATS
# (PULSE_BUS_URL) the relay's connection has the same name, and an edge's only
# while it falls back.
APPLICATION_NAME = "pulse listener"


class ListenSource:
    def __init__(
        self,
        db: Database,
        *,
        backoff_max_s: float = 5.0,
        on_reconnected: Callable[[], None] = lambda: None,
    ) -> None:
        self._db = db
        self._on_reconnected = on_reconnected
        self._backoff_max_s = backoff_max_s
        self._channels: dict[str, str] = {}  # tenant -> channel, asked once each
        self._wanted: set[str] = set()  # channels
        self._listening: set[str] = set()
        self._conn: asyncpg.Connection | None = None
        self._wakeups: Wakeups | None = None
        self._lock = asyncio.Lock()  # one command at a time on the connection
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self.reconnects = 0
        self.last_wakeup_at: float | None = None

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    @property
    def watched(self) -> int:
        return len(self._wanted)

    async def run(self, wakeups: Wakeups) -> None:
        """Connect, listen, and reconnect for as long as the task lives."""
        self._wakeups = wakeups
        attempt = 0
        connected_before = False
        unavailable = Throttled(log)  # a line per 10 s of an outage
        while True:
            try:
                async with self._db.dedicated(APPLICATION_NAME) as conn:
                    await self._listen_on(conn)
                    attempt = 0
                    if connected_before:
                        self.reconnects += 1
                        self._on_reconnected()
                        log.info("listener reconnected; backfilling %d channels", self.watched)
                    connected_before = True
                    wakeups.resync()
                    await self._watch(conn)
            except DatabaseUnavailable as exc:
                attempt += 1
                delay = random.uniform(0, min(self._backoff_max_s, 0.1 * 2**attempt))
                unavailable.warning("listener: database unavailable (%s); retrying", exc)
                await asyncio.sleep(delay)
            finally:
                self._up.clear()
                self._conn = None
                self._listening = set()

    async def _listen_on(self, conn: asyncpg.Connection) -> None:
        self._lost.clear()
        conn.add_termination_listener(lambda _c: self._lost.set())
        async with self._lock:
            self._conn = conn
            self._listening = set()
            for channel in sorted(self._wanted):
                await conn.add_listener(channel, self._deliver)
                self._listening.add(channel)
        self._up.set()

    async def _watch(self, conn: asyncpg.Connection) -> None:
        """Return when the connection is lost; a periodic query catches silent deaths."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), HEALTH_CHECK_S)
                break
            try:
                async with self._lock:
                    with translated():
                        await conn.fetchval("SELECT 1", timeout=HEALTH_CHECK_S)
            except DatabaseUnavailable as exc:
                log.warning("listener health check failed: %s", exc)
                break
        log.warning("listener connection lost")

    def _deliver(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        # Called by asyncpg for each notification: must never block.
        self.last_wakeup_at = time.monotonic()
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError:
            log.error("ignoring a notification that is not JSON: %.100r", payload)
            return
        if not isinstance(message, dict) or self._wakeups is None:
            return
        tenant, kind = str(message.get("tenant")), message.get("kind")
        if kind == "telemetry":
            last = message.get("last")
            self._wakeups.events_after(tenant, last if isinstance(last, int) else None)
        elif isinstance(kind, str):
            self._wakeups.signal(tenant, kind)

    async def watch(self, tenant_id: str, timeout: float = 10.0) -> None:
        """Listen to the tenant's channel from now on; waits until the connection is up."""
        channel = await self._channel(tenant_id)
        self._wanted.add(channel)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that arrives as the wait ends.
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            self._wanted.discard(channel)
            raise DatabaseUnavailable("the listener is not connected") from None
        await self._listen_now(channel)

    async def want(self, tenant_id: str) -> None:
        """Listen to the tenant's channel whenever connected, without waiting for a
        connection (the NATS source's fallback: it runs only while NATS is away)."""
        channel = await self._channel(tenant_id)
        self._wanted.add(channel)
        await self._listen_now(channel)

    async def _channel(self, tenant_id: str) -> str:
        channel = self._channels.get(tenant_id)
        if channel is None:
            channel = self._channels[tenant_id] = str(
                await self._db.fetchval(Q["channel_for_tenant"], tenant_id)
            )
        return channel

    async def _listen_now(self, channel: str) -> None:
        async with self._lock:
            if (
                self._conn is not None
                and channel in self._wanted
                and channel not in self._listening
            ):
                try:
                    with translated():
                        await self._conn.add_listener(channel, self._deliver)
                    self._listening.add(channel)
                except DatabaseUnavailable as exc:
                    # The reconnect will listen again; the caller's backfill covers the gap.
                    log.warning("LISTEN %s failed: %s", channel, exc)

    async def unwatch(self, tenant_id: str) -> None:
        channel = self._channels.get(tenant_id)
        if channel is None:
            return
        self._wanted.discard(channel)
        async with self._lock:
            if self._conn is not None and channel in self._listening:
                self._listening.discard(channel)
                try:
                    with translated():
                        await self._conn.remove_listener(channel, self._deliver)
                except DatabaseUnavailable as exc:
                    log.warning("UNLISTEN %s failed: %s", channel, exc)
