"""How many history answers are read and sent at once: exports, and JSON answers.

An export (``reads.export_readings``, ``reads.export_series``) reads through a
server-side cursor, on one pooled connection, for as long as its client takes to
read it. Without a bound, a few slow downloads would hold every connection of the
pool, and ingest and streams would wait for them. So a process streams at most
``per_process`` exports at once, a tenant at most ``per_tenant`` of them; the next is
refused with ``export_limit`` (429) until one ends.

A JSON answer (buckets, or a page of readings) is built whole in memory, up to a
page's byte bound or MAX_ANSWER_POINTS, and held until its client has taken it: 60
connections of one token that read only the head of 16.5 MB pages held 1.2 GB. So
they have slots of their own, taken before the answer is read from the database and
given back once it is sent; beyond them, ``history_limit`` (429).

A slot is taken when the request is answered and given back when its body ends:
read to the end, failed, closed by the server (the client left, the answer timed
out), or never sent at all (then when the body is dropped).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

from pulse.errors import EXPORT_LIMIT, HISTORY_LIMIT, ApiError, ErrorCode

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What a request is refused with when no slot is free."""

    error: ErrorCode
    retry_after_s: int
    server_full: str
    tenant_full: str  # {n}: the tenant's limit


EXPORTS = Refusal(
    EXPORT_LIMIT,
    5,
    "This server streams as many exports as it allows; retry shortly.",
    "The tenant streams {n} export(s) at once already; retry when one has ended.",
)
JSON_ANSWERS = Refusal(
    HISTORY_LIMIT,
    1,
    "This server reads and sends as many history answers at once as it allows; retry shortly.",
    "The tenant reads {n} history answer(s) at once already; retry when one has been sent.",
)


class Slots:
    def __init__(self, per_process: int, per_tenant: int, refusal: Refusal = EXPORTS) -> None:
        self.per_process = per_process
        self.per_tenant = per_tenant
        self.refusal = refusal
        self._by_tenant: dict[str, int] = {}
        self.held = 0

    def take(self, tenant_id: str) -> Slot:
        """One of the tenant's slots, given back by ``Slot.release`` (or by the body
        ``Slot.hold`` wraps); ApiError (the refusal's) when none is free."""
        if self.held >= self.per_process:
            raise self._refused(self.refusal.server_full)
        if self._by_tenant.get(tenant_id, 0) >= self.per_tenant:
            raise self._refused(self.refusal.tenant_full.format(n=self.per_tenant))
        self.held += 1
        self._by_tenant[tenant_id] = self._by_tenant.get(tenant_id, 0) + 1
        return Slot(functools.partial(self._release, tenant_id))

    def stream(self, tenant_id: str, body: AsyncIterator[T]) -> AsyncIterator[T]:
        """``body``, holding one of the tenant's slots until it ends."""
        return self.take(tenant_id).hold(body)

    def _release(self, tenant_id: str) -> None:
        self.held -= 1
        left = self._by_tenant[tenant_id] - 1
        if left:
            self._by_tenant[tenant_id] = left
        else:
            del self._by_tenant[tenant_id]

    def _refused(self, detail: str) -> ApiError:
        return ApiError(
            self.refusal.error, detail, {"Retry-After": str(self.refusal.retry_after_s)}
        )


class Slot:
    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        """Give the slot back; later calls do nothing."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def hold(self, body: AsyncIterator[T]) -> AsyncIterator[T]:
        """``body``, giving the slot back when it ends or is closed, or when it is
        dropped unread."""
        return _Held(body, weakref.finalize(body, self.release))


class _Held(AsyncIterator[T]):
    """A body and its slot: the slot is given back once, when the body ends or is
    closed, or when it is dropped unread (``weakref.finalize`` on the body)."""

    def __init__(
        self, body: AsyncIterator[T], release: weakref.finalize[[], AsyncIterator[T]]
    ) -> None:
        self._body = body
        self._release = release

    async def __anext__(self) -> T:
        try:
            return await anext(self._body)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        try:
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            self._release()  # a finalize runs once: later calls do nothing
