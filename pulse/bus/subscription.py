"""One subscriber's view of a tenant's events: its filters and its bounded queue."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Protocol

from pulse.bus.events import TelemetryEvent

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Filters:
    device_ids: frozenset[str] | None = None  # None: every device
    metrics: frozenset[str] | None = None  # None: every metric

    def accepts(self, event: TelemetryEvent) -> bool:
        if self.device_ids is not None and event.device_id not in self.device_ids:
            return False
        return self.metrics is None or event.has_any_metric(self.metrics)


class Sink(Protocol):
    """Where a subscriber's events go when the hub may hand them over itself.

    Given when the subscription is made, by the stream that reads it.
    """

    def write_now(self, events: list[TelemetryEvent]) -> bool:
        """Send ``events`` to the client at once, without waiting, or return False
        (nothing sent; they are queued as usual)."""

    def abort(self) -> None:
        """The subscription was cut as lagging a while ago: end its stream now, and
        drop its connection if the client has not read what was sent to it."""


class Lagging(Exception):
    """The subscriber fell behind by a whole queue; it must reconnect and resume."""


class Closing(Exception):
    """The server is shutting down; the client should reconnect (elsewhere) and resume."""


class Subscription:
    """Events matching ``filters``, in id order, each once.

    ``position`` is the newest id this subscription has passed, sent or filtered
    out: a client that has received everything queued may resume from it.
    When events come while ``limit`` events or more still wait in the queue, the
    subscription is marked lagging, its queue is dropped (the client resumes from
    the table), and the hub is told.

    ``sink``, when given, takes events straight to the client from the hub's own
    call, without waking the stream's task: only while that task is parked in
    ``wait`` with nothing queued, so everything before has been sent and nothing
    is being sent. When it cannot write at once (the client has not read what
    came before), the events are queued as usual.
    """

    def __init__(
        self,
        tenant_id: str,
        filters: Filters,
        *,
        kind: str,
        limit: int,
        signals: frozenset[str] = frozenset(),
        position: int = 0,
        sink: Sink | None = None,
    ) -> None:
        self.tenant_id = tenant_id
        self.filters = filters
        self.kind = kind
        self.signals = signals
        self.position = position
        self.lagging = False
        self.closing = False
        self._limit = limit
        # A list and a future, not a deque and an asyncio.Event: an idle
        # subscription is most of what a connection costs, and each of those
        # allocates about 760 bytes up front.
        self._queue: list[TelemetryEvent] = []
        self._pending_signals: set[str] = set()
        self._woken = False  # something for the stream's task: events, signals, an end
        self._waiter: asyncio.Future[None] | None = None
        self._parked = False  # the stream's task waits in `wait` for the next event
        self.sink = sink
        # When a signal last came (monotonic): what the stream reads on a signal
        # must be at least that fresh (pulse.db.shared).
        self.signalled_at = time.monotonic()

    # -- the hub's side -------------------------------------------------------

    def offer(self, events: list[TelemetryEvent]) -> tuple[int, bool]:
        """Take the events this subscription wants: how many, and whether the sink
        wrote them out at once (else they are queued for the stream's task)."""
        if self.lagging:
            return 0, False
        queued = 0
        accepts = self.filters.accepts
        queue = self._queue
        # Behind: a whole queue of earlier events still waits as more come. Not "this
        # call would pass the limit": one commit larger than the queue (a batch of
        # PULSE_QUEUE_SIZE + 1, a fetch of FETCH_LIMIT after a gap) is taken whole by
        # a subscriber that took everything before, as it comes in one piece, instead
        # of cutting every subscriber of the tenant at once (the protocol audit). So
        # a queue holds fewer than ``limit`` events plus one call's worth at most.
        behind = len(queue) >= self._limit
        for event in events:
            if event.id <= self.position:
                continue  # already replayed from the table
            self.position = event.id
            if accepts(event):
                if behind:
                    self._mark_lagging()
                    return 0, False
                queue.append(event)
                queued += 1
        if not queued:
            return 0, False
        if len(queue) == queued and self._delivered_now():
            return queued, True
        self._wake()
        return queued, False

    def _delivered_now(self) -> bool:
        """Hand the queue to the sink if the stream is parked with nothing pending."""
        if not self._parked or self._woken or self.sink is None:
            return False
        try:
            delivered = self.sink.write_now(self._queue)
        except Exception:
            log.exception("a direct delivery failed; queueing the events instead")
            return False
        if delivered:
            self._queue = []
        return delivered

    def notify(self, signal: str) -> None:
        if signal in self.signals:
            self.signalled_at = time.monotonic()
            self._pending_signals.add(signal)
            self._wake()

    def close(self) -> None:
        """End the subscription: the stream stops taking events and tells its client why."""
        self.closing = True
        self._wake()

    def _mark_lagging(self) -> None:
        self.lagging = True
        self._queue = []
        self._wake()

    def _wake(self) -> None:
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the stream's side ----------------------------------------------------

    def skip_through(self, event_id: int) -> None:
        """Everything up to ``event_id`` was sent from the table: drop it from the queue."""
        queue = self._queue
        sent = 0
        while sent < len(queue) and queue[sent].id <= event_id:
            sent += 1
        del queue[:sent]
        self.position = max(self.position, event_id)

    def set_filters(self, filters: Filters) -> None:
        """New filters apply to what is queued as well as to what comes next."""
        self.filters = filters
        self._queue = [e for e in self._queue if filters.accepts(e)]

    def pending(self) -> int:
        return len(self._queue)

    def take(self, max_events: int = 512) -> list[TelemetryEvent]:
        if self.lagging:
            raise Lagging
        if self.closing:
            raise Closing
        taken = self._queue
        if len(taken) <= max_events:
            self._queue = []
        else:
            self._queue = taken[max_events:]
            del taken[max_events:]
        if not self._queue and not self._pending_signals:
            self._woken = False
        return taken

    def take_signals(self) -> set[str]:
        signals, self._pending_signals = self._pending_signals, set()
        # Lagging or closing empties the queue but still has to wake the stream.
        if not self._queue and not self.lagging and not self.closing:
            self._woken = False
        return signals

    async def wait(self, timeout: float | None) -> bool:
        """Wait until something is queued (True) or ``timeout`` passes (False)."""
        if self._woken:
            return True
        # A timer on the waiter itself, not asyncio.timeout or wait_for: an
        # idle stream waits here for as long as it is open, and the timeout's
        # context manager and task bookkeeping would cost every connection
        # about 400 bytes. A cancellation simply cancels the waiter.
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _time_out, waiter)
        self._parked = True
        try:
            await waiter
        finally:
            self._parked = False
            self._waiter = None
            if timer is not None:
                timer.cancel()
        # Events may have come in just as the timer fired: a stream must not
        # take this for an idle moment and announce a position past events it
        # has not sent yet.
        return self._woken


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
