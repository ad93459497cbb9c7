"""What feeds the hub: an event source, and the wake-ups it sends.

An event source tells the hub *that* a tenant has new events, and may hand
over the events themselves with the id they follow (``deliver``): the hub
publishes those that follow what it delivered, and reads anything else from
the table (``pulse.bus.store``), which stays the truth and the resume point.
So a source may lose, merge or repeat wake-ups and messages at no cost but
latency, as long as it calls ``resync`` whenever it may have missed some (a
reconnect) without a later message to show the gap.

PostgreSQL's LISTEN (``pulse.bus.listen``) sends wake-ups; NATS
(``pulse.bus.nats_source``) delivers the events a relay published, and falls
back to LISTEN while NATS is away.
"""

from __future__ import annotations

from typing import Protocol

from pulse.bus.events import TelemetryEvent


class Wakeups(Protocol):
    """What a source tells the hub (the hub implements this)."""

    def events_after(self, tenant_id: str, last_id: int | None) -> None:
        """``tenant_id`` committed events, up to ``last_id`` when the source knows it."""

    def deliver(self, tenant_id: str, after: int, events: list[TelemetryEvent]) -> None:
        """Every event of ``tenant_id`` with an id in (``after``, the last one's], in id order."""

    def signal(self, tenant_id: str, kind: str) -> None:
        """Something else of ``tenant_id`` changed (``devices``, ``alerts``)."""

    def resync(self) -> None:
        """Wake-ups may have been missed: every tenant watched reads the table again."""


class EventSource(Protocol):
    """Wake-ups for the tenants watched, from ``watch`` on until ``unwatch``."""

    @property
    def connected(self) -> bool:
        """Whether wake-ups flow right now (readiness, status)."""

    @property
    def watched(self) -> int:
        """How many tenants are watched."""

    @property
    def reconnects(self) -> int: ...

    @property
    def last_wakeup_at(self) -> float | None:
        """When the last wake-up came (monotonic seconds), None before the first."""

    async def watch(self, tenant_id: str) -> None:
        """From the return on, whatever ``tenant_id`` commits is woken for.

        Raises DatabaseUnavailable when that cannot be promised.
        """

    async def unwatch(self, tenant_id: str) -> None: ...

    async def run(self, wakeups: Wakeups) -> None:
        """Deliver wake-ups to ``wakeups`` for as long as the task lives (supervised)."""
