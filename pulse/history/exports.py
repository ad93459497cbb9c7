"""How many exports stream at once: each holds a pooled connection and a snapshot.

An export (``reads.export_readings``, ``reads.export_series``) reads through a
server-side cursor, on one pooled connection, for as long as its client takes to
read it. Without a bound, a few slow downloads would hold every connection of the
pool, and ingest and streams would wait for them. So a process streams at most
``per_process`` exports at once, a tenant at most ``per_tenant`` of them; the next is
refused with ``export_limit`` (429) until one ends.

A slot is taken when the request is answered and given back when its body ends:
read to the end, failed, closed by the server (the client left, the export timed
out), or never sent at all (then when the body is dropped).
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from typing import TypeVar

from pulse.errors import EXPORT_LIMIT, ApiError

T = TypeVar("T")

RETRY_AFTER_S = 5


class ExportSlots:
    def __init__(self, per_process: int, per_tenant: int) -> None:
        self.per_process = per_process
        self.per_tenant = per_tenant
        self._by_tenant: dict[str, int] = {}
        self.held = 0

    def stream(self, tenant_id: str, body: AsyncIterator[T]) -> AsyncIterator[T]:
        """``body``, holding one of the tenant's slots until it ends; ApiError
        (export_limit) when none is free."""
        if self.held >= self.per_process:
            raise _refused("This server streams as many exports as it allows; retry shortly.")
        if self._by_tenant.get(tenant_id, 0) >= self.per_tenant:
            raise _refused(
                f"The tenant streams {self.per_tenant} export(s) at once already; "
                "retry when one has ended."
            )
        self.held += 1
        self._by_tenant[tenant_id] = self._by_tenant.get(tenant_id, 0) + 1
        return _Held(body, weakref.finalize(body, self._release, tenant_id))

    def _release(self, tenant_id: str) -> None:
        self.held -= 1
        left = self._by_tenant[tenant_id] - 1
        if left:
            self._by_tenant[tenant_id] = left
        else:
            del self._by_tenant[tenant_id]


class _Held(AsyncIterator[T]):
    """An export's body and its slot: the slot is given back once, when the body ends
    or is closed, or when it is dropped unread (``weakref.finalize`` on the body)."""

    def __init__(
        self, body: AsyncIterator[T], release: weakref.finalize[[str], AsyncIterator[T]]
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


def _refused(detail: str) -> ApiError:
    return ApiError(EXPORT_LIMIT, detail, {"Retry-After": str(RETRY_AFTER_S)})
