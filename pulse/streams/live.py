"""Replay from the table, then live: the one loop behind every stream (SSE, WebSocket, v2).

The order of steps is what makes replay and live meet exactly:
1. take the tenant's newest committed id: the newest the hub delivered when the
   tenant's topic is open in this process (no query), else the table's; a stream
   that announces where it starts (the WebSocket's "connected") always reads the
   table, since the hub may be a few events behind the last commit; the SSE
   handlers take it before their response head (``begin``);
2. with a resume position, replay (position, newest] from the table, before
   subscribing, so a long replay cannot fill the live queue behind it;
3. subscribe: the subscription starts at the newest id the hub had delivered,
   and every later event comes through it; replay up to that id;
4. drop from the live queue what the replay already sent, and go live.
Ids are in commit order, so "greater than the last id sent" is a complete and
duplicate-free description of what is still owed.

Live, the loop waits for events, signals or the idle timeout, and ends the
stream at the token's expiry, when the subscriber lags, and when the server
shuts down. A stream without replay (v2) starts at step 3, without its replay.

A handler whose connection can take bytes at once (``Output``) gets its live
events written from the hub's own call while it waits (``Live`` is the
subscription's sink), which is what bounds latency with many subscribers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from typing import Any, Protocol

from pulse.bus.events import TelemetryEvent
from pulse.bus.hub import Hub
from pulse.bus.store import EventStore
from pulse.bus.subscription import Closing, Filters, Lagging, Subscription
from pulse.errors import LAGGING, SERVER_RESTARTING, TOKEN_EXPIRED, ErrorCode

log = logging.getLogger(__name__)

REPLAY_PAGE = 2000
# A write to the client carries events of at most about this many bytes (one event
# at least): a client that stops reading holds one such write of the server's
# memory until it is cut as lagging, not a whole batch of large events (512 events
# of 200 metrics are 7 MB, and every such client held its own copy).
WRITE_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True)
class Started:
    """First item of a stream with replay: the tenant's newest committed id when it began."""

    newest_id: int


@dataclasses.dataclass(frozen=True)
class Reset:
    """The resume position could not be honoured as asked; ``data`` says why."""

    data: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Idle:
    """Nothing to send for a while; ``position`` is the newest id passed so far."""

    position: int


@dataclasses.dataclass(frozen=True)
class Signals:
    """The tenant's devices or alerts changed (the kinds the stream asked for)."""

    kinds: frozenset[str]


@dataclasses.dataclass(frozen=True)
class End:
    """The stream is over: ``error`` is lagging, token_expired or server_restarting."""

    error: ErrorCode


Item = list[TelemetryEvent] | Started | Reset | Idle | Signals | End


class Output(Protocol):
    """A connection that can take a stream's bytes at once (pulse.web.direct.DirectWrites)."""

    def write_now(self, data: bytes) -> bool: ...

    def abort_unread(self) -> None: ...


# How a handler frames events for its wire: SSE chunks, WebSocket frames.
Frame = Callable[[list[TelemetryEvent], frozenset[str] | None], bytes]


class Live:
    def __init__(
        self,
        hub: Hub,
        store: EventStore,
        tenant_id: str,
        filters: Filters,
        *,
        kind: str,
        expires_at: float,
        idle_s: Callable[[], float | None],
        idle_is_silence: bool = True,
        last_event_id: int | None = None,
        replay: bool = True,
        announces_start: bool = False,
        signals: frozenset[str] = frozenset(),
        output: Output | None = None,
        frame: Frame | None = None,
    ) -> None:
        self.hub = hub
        self.store = store
        self.tenant_id = tenant_id
        self.filters = filters
        self.kind = kind
        self.expires_at = expires_at  # time.time() seconds; the WebSocket may extend it
        self.idle_s = idle_s  # None: no idle timeout
        # Idle after idle_s without a message to the client (a ping, a keepalive), or
        # (False) after idle_s whatever was sent: a schedule (the v2 pushes).
        self.idle_is_silence = idle_is_silence
        self._sent_at = time.monotonic()  # the last message to the client, about
        self.last_event_id = last_event_id
        self.replay = replay
        # Its client is told the start as "the tenant's newest committed id".
        self.announces_start = announces_start
        self.signals = signals
        self.position = 0  # newest id passed, sent or filtered out
        self.subscription: Subscription | None = None
        self._output = output if frame is not None else None
        self._frame = frame
        # The newest id the hub wrote at once (write_now), for the handler's bookkeeping.
        self.written_now = 0
        self.subscribed = asyncio.Event()  # set once the subscription is open
        self._consumer: asyncio.Task[Any] | None = None
        self._ended = False
        self._started: int | None = None  # the start, once taken (begin)
        self._end_with: ErrorCode | None = None  # ended from outside (end)

    def set_filters(self, filters: Filters) -> None:
        self.filters = filters
        if self.subscription is not None:
            self.subscription.set_filters(filters)

    def end(self, error: ErrorCode) -> None:
        """End the stream from outside: its task yields ``End(error)`` as soon as it is
        live (after a replay under way)."""
        self._end_with = error
        if self.subscription is not None:
            self.subscription.close()

    async def begin(self) -> None:
        """Take the stream's start (step 1), once. A handler that calls it before its
        response head makes the head a promise: nothing committed after the client saw
        it is missed (a client that opens a stream and then makes a device report,
        say). ``items`` takes it itself where no handler did."""
        if self._started is not None or not self.replay:
            return
        newest = None if self.announces_start else self.hub.newest_delivered(self.tenant_id)
        if newest is None or (self.last_event_id or 0) > newest:
            # No topic here, a start to announce, or a client resuming from further
            # than this process has delivered (it read another process): the table
            # says how far it goes. A stream that starts a few events behind the
            # last commit, from the hub, is sent those events live.
            newest = await self.store.newest_id(self.tenant_id)
        self._started = newest

    async def items(self) -> AsyncGenerator[Item, None]:
        if self.replay:
            await self.begin()
            newest = self._started
            assert newest is not None
            self.position = newest
            yield Started(newest)
            if self.last_event_id is not None:
                async for item in self._resume(self.last_event_id, newest):
                    yield item
        async with self.hub.subscribe(
            self.tenant_id, self.filters, kind=self.kind, signals=self.signals, sink=self
        ) as subscription:
            self.subscription = subscription
            self._consumer = asyncio.current_task()
            self.subscribed.set()
            if self._end_with is not None:
                subscription.close()
            try:
                if subscription.filters != self.filters:
                    # Changed (by a WebSocket client) while the subscription was opening.
                    subscription.set_filters(self.filters)
                if self.replay:
                    async for batch in self._replay(self.position, subscription.position):
                        yield batch
                    subscription.skip_through(self.position)
                async for item in self._live(subscription):
                    yield item
            finally:
                self._ended = True

    # -- the subscription's sink (pulse.bus.subscription.Sink) ----------------------

    def write_now(self, events: list[TelemetryEvent]) -> bool:
        # Past the token's expiry the stream's task ends the stream instead.
        if self._output is None or self._frame is None or time.time() >= self.expires_at:
            return False
        data = self._frame(events, self.filters.metrics)
        if len(data) > WRITE_BYTES or not self._output.write_now(data):
            return False  # queued: the stream's task sends it in parts
        self.position = max(self.position, events[-1].id)
        self.written_now = events[-1].id
        self._sent_at = time.monotonic()
        return True

    def abort(self) -> None:
        if self._consumer is not None and not self._ended:
            # Stuck writing to a client that stopped reading: the client's doing, counted
            # by pulse_lagging_disconnects_total, so not a warning (the soak audit: one
            # per stalled dashboard paged whoever alerts on warnings).
            log.info("a lagging %s stream did not end by itself; cancelling it", self.kind)
            self._consumer.cancel()
        if self._output is not None:
            # Ended or not, a client that has not read what was written to it by now
            # has stopped reading: its connection would otherwise stay open, holding
            # its buffers, for as long as it likes.
            self._output.abort_unread()

    # -- replay and live ------------------------------------------------------------

    def _idle_in(self) -> float | None:
        """Seconds until the stream is idle (0: it is); None: never. Live events the hub
        wrote straight out (write_now) did not wake this task, and count as messages."""
        idle = self.idle_s()
        if idle is None or not self.idle_is_silence:
            return idle
        return max(0.0, idle - (time.monotonic() - self._sent_at))

    async def _resume(self, last_event_id: int, newest: int) -> AsyncIterator[Item]:
        if last_event_id > newest:
            yield Reset({"reason": "unknown_position", "last_event_id": newest})
            return
        if last_event_id == newest:
            return  # nothing is owed (a reconnect at the head), trimmed or not
        cursor = last_event_id
        earliest = await self.store.earliest_id(self.tenant_id)
        if earliest is None:
            # Not one row left (retention dropped every day the tenant wrote in): the
            # earliest event there will be is the next one.
            earliest = newest + 1
        if last_event_id + 1 < earliest:
            yield Reset({"reason": "history_trimmed", "earliest_id": earliest})
            cursor = earliest - 1
        async for batch in self._replay(cursor, newest):
            yield batch

    async def _replay(self, after: int, upto: int) -> AsyncIterator[list[TelemetryEvent] | Reset]:
        cursor = after
        while cursor < upto and not self.hub.draining:
            filters = self.filters
            page = await self.store.events_after(
                self.tenant_id, cursor, upto=upto, device_ids=filters.device_ids, limit=REPLAY_PAGE
            )
            if not page or page[0].id > cursor + 1:
                # Ids are dense: what is missing was filtered out, or dropped by
                # retention while this replay ran (a day's partition at once). The
                # client hears of the latter as it would have at the start.
                earliest = await self.store.earliest_id(self.tenant_id)
                if earliest is None or earliest > cursor + 1:
                    earliest = min(earliest or upto + 1, page[0].id if page else upto + 1)
                    yield Reset({"reason": "history_trimmed", "earliest_id": earliest})
            if not page:
                break
            cursor = page[-1].id
            batch = page if filters.metrics is None else [e for e in page if filters.accepts(e)]
            for part in parts(batch):
                yield part
            if len(page) < REPLAY_PAGE:
                break
        self.position = max(self.position, upto)

    async def _live(self, subscription: Subscription) -> AsyncIterator[Item]:
        self._sent_at = time.monotonic()
        while True:
            remaining = self.expires_at - time.time()
            if remaining <= 0:
                yield End(TOKEN_EXPIRED)
                return
            idle = self._idle_in()
            if not await subscription.wait(remaining if idle is None else min(idle, remaining)):
                spoke = self.idle_is_silence and self._idle_in()  # written straight out
                if time.time() < self.expires_at and not spoke:
                    self.position = max(self.position, subscription.position)
                    yield Idle(self.position)
                    self._sent_at = time.monotonic()
                continue
            try:
                batch = subscription.take()
            except Lagging:
                yield End(LAGGING)
                return
            except Closing:
                yield End(self._end_with or SERVER_RESTARTING)
                return
            kinds = subscription.take_signals()
            for part in parts(batch):
                self.position = max(self.position, part[-1].id)
                yield part
                self._sent_at = time.monotonic()
            if kinds:
                yield Signals(frozenset(kinds))


def parts(events: list[TelemetryEvent], limit: int = WRITE_BYTES) -> Iterator[list[TelemetryEvent]]:
    """``events`` in consecutive runs of at most ``limit`` bytes of metrics, or of one
    event where that one is larger; nothing for no events."""
    start = size = 0
    for i, event in enumerate(events):
        size += len(event.metrics_json)
        if size > limit and i > start:
            yield events[start:i]
            start, size = i, len(event.metrics_json)
    if start < len(events):
        yield events[start:] if start else events
