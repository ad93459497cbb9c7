"""The process's one connection to NATS, and the one place that knows the bus's subjects
and messages (PULSE_BUS_URL).

Subjects, per database (``pulse_bus_database_id()``, migrations/0006):
``pulse.<database id>.t.<tenant>`` carries a tenant's new events and its change
signals; ``pulse.<database id>.relay`` carries the relay's heartbeats. A tenant
id may hold ``.`` (a subject separator) and the operators' topic is ``*`` (a
wildcard): both are escaped, so one tenant is always one subject token.

Messages are JSON. Events: ``{"after": n, "events": [[id, device_id, time,
metrics_json], ...]}``, every event of the tenant with an id in (after, last],
each encoded once, by the relay, for every process, in messages no larger than
the server takes (its ``max_payload``, from its INFO). An event that alone is
larger is not published: the next message's ``after`` shows the gap, which the
edges read from the table, and at once ``{"after": n, "events": []}`` says
that the tenant has events up to n (``encode_wakeup``). A signal: ``{"signal":
"alerts"}``. A heartbeat: ``{"relay": "<id of this reign>"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import orjson
from nats.aio.client import Client
from nats.errors import SlowConsumerError

from pulse.bus.events import TelemetryEvent
from pulse.db.database import Database
from pulse.db.queries import load_queries

log = logging.getLogger(__name__)
Q = load_queries(__package__)

RECONNECT_WAIT_S = 0.5
# A server that stopped answering (rather than closing the connection) is noticed
# within PING_INTERVAL_S x (MAX_OUTSTANDING_PINGS + 1).
PING_INTERVAL_S = 2
MAX_OUTSTANDING_PINGS = 2
# A message stays well below the server's max_payload (1 MiB by default), and never
# above it (message_limit).
MAX_MESSAGE_BYTES = 256 * 1024


async def database_id(db: Database) -> str:
    """What names this database on the bus."""
    return str(await db.fetchval(Q["bus_database_id"]))


def tenant_subject(database: str, tenant_id: str) -> str:
    return f"pulse.{database}.t.{_token(tenant_id)}"


def relay_subject(database: str) -> str:
    return f"pulse.{database}.relay"


def _token(tenant_id: str) -> str:
    # '%' first, so that escapes cannot be confused with what they replace.
    return tenant_id.replace("%", "%25").replace(".", "%2E").replace("*", "%2A").replace(">", "%3E")


# -- messages ---------------------------------------------------------------------


class EventsMessage(NamedTuple):
    data: bytes
    last: int  # the id of its last event: the next message's ``after``
    event_count: int


def message_limit(max_payload: int) -> int:
    """The largest message to publish to a server that takes ``max_payload`` bytes (what
    nats-py read from its INFO: a larger one it refuses before sending)."""
    return max(1, min(MAX_MESSAGE_BYTES, max_payload))


def encode_events(
    after: int, events: list[TelemetryEvent], limit: int = MAX_MESSAGE_BYTES
) -> Iterator[EventsMessage]:
    """Messages for ``events`` (every event in (after, last]), none above ``limit``
    bytes unless one event alone is (then a message of that event only)."""
    parts: list[bytes] = []
    size = _envelope_size(after)
    last = after
    for event in events:
        part = orjson.dumps([event.id, event.device_id, event.time, event.metrics_json])
        if parts and size + 1 + len(part) > limit:  # 1: a comma
            yield EventsMessage(_events_message(after, parts), last, len(parts))
            after, parts = last, []
            size = _envelope_size(after)
        size += len(part) + (1 if parts else 0)
        parts.append(part)
        last = event.id
    if parts:
        yield EventsMessage(_events_message(after, parts), last, len(parts))


def encode_wakeup(last: int) -> bytes:
    """Events up to ``last`` are committed, and none of them are in this message (they
    could not be published): edges read them from the table."""
    return _events_message(last, [])


def _envelope_size(after: int) -> int:
    return len(_events_message(after, []))


def _events_message(after: int, parts: list[bytes]) -> bytes:
    return b'{"after":%d,"events":[%s]}' % (after, b",".join(parts))


def encode_signal(kind: str) -> bytes:
    return orjson.dumps({"signal": kind})


def encode_heartbeat(relay_id: str) -> bytes:
    return orjson.dumps({"relay": relay_id})


class Events:
    __slots__ = ("after", "events")

    def __init__(self, after: int, events: list[TelemetryEvent]) -> None:
        self.after = after
        self.events = events


class Signal:
    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind


def decode(data: bytes) -> Events | Signal | None:
    """A tenant subject's message; None for anything unknown (a newer relay's)."""
    message: Any = orjson.loads(data)
    if not isinstance(message, dict):
        return None
    if "events" in message:
        return Events(
            int(message["after"]),
            [TelemetryEvent(int(i), str(d), str(t), str(m)) for i, d, t, m in message["events"]],
        )
    kind = message.get("signal")
    return Signal(kind) if isinstance(kind, str) else None


def decode_heartbeat(data: bytes) -> str | None:
    message: Any = orjson.loads(data)
    relay = message.get("relay") if isinstance(message, dict) else None
    return relay if isinstance(relay, str) else None


# -- the connection -----------------------------------------------------------------


class NatsLink:
    """Connects (retrying for as long as it runs), and lets nats-py reconnect by itself.

    ``up`` is set while connected. ``generation`` grows at every loss of the
    connection: whatever was published or received across one may be lost, so
    the relay ends its reign and the edges read the table again. Listeners
    (``on_change``) hear of every change: ``up``, ``down``, ``slow_consumer``.
    """

    def __init__(self, url: str, *, name: str | None = None) -> None:
        self.url = url
        self.name = name or f"pulse {socket.gethostname()}:{os.getpid()}"
        self.client: Client | None = None
        self.up = asyncio.Event()
        self.generation = 0
        self.reconnects = 0
        self._listeners: list[Callable[[str], None]] = []
        self._failures = 0

    def on_change(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    @property
    def connected(self) -> bool:
        return self.up.is_set()

    def _tell(self, change: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:
                log.exception("a listener of the NATS connection failed")

    def _set_down(self) -> None:
        if self.up.is_set():
            self.up.clear()
            self.generation += 1
            self._tell("down")

    def _set_up(self) -> None:
        self._failures = 0
        if not self.up.is_set():
            self.up.set()
            self._tell("up")

    async def run(self) -> None:
        """Connect and stay connected for as long as the task lives (supervised)."""
        client = Client()
        closed = asyncio.Event()

        async def on_disconnected() -> None:
            if not client.is_closed:
                log.warning("bus: disconnected from NATS; reconnecting")
            self._set_down()

        async def on_reconnected() -> None:
            self.reconnects += 1
            log.info("bus: reconnected to NATS")
            self._set_up()

        async def on_closed() -> None:
            closed.set()

        async def on_error(exc: Exception) -> None:
            if isinstance(exc, SlowConsumerError):
                self._tell("slow_consumer")
                return
            self._failures += 1
            if self._failures == 1:
                log.warning("bus: NATS at %s: %s", self.url, str(exc) or type(exc).__name__)
            else:
                log.debug("bus: NATS at %s: %s", self.url, str(exc) or type(exc).__name__)

        try:
            await client.connect(
                servers=[url.strip() for url in self.url.split(",") if url.strip()],
                name=self.name,
                allow_reconnect=True,
                max_reconnect_attempts=-1,  # the first connection too
                reconnect_time_wait=RECONNECT_WAIT_S,  # type: ignore[arg-type]
                connect_timeout=2,
                ping_interval=PING_INTERVAL_S,
                max_outstanding_pings=MAX_OUTSTANDING_PINGS,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                closed_cb=on_closed,
                error_cb=on_error,
            )
            self.client = client
            log.info("bus: connected to NATS at %s", self.url)
            self._set_up()
            await closed.wait()
            log.error("bus: the NATS connection closed; connecting again")
        finally:
            self._set_down()
            self.client = None
            with contextlib.suppress(Exception):
                await client.close()
