"""Connection limits shared by every stream kind: per process and per tenant."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator


class LimitReached(Exception):
    pass


class ConnectionLimits:
    def __init__(self, max_total: int, max_per_tenant: int) -> None:
        self.max_total = max_total
        self.max_per_tenant = max_per_tenant
        self.by_kind: collections.Counter[str] = collections.Counter()
        self._by_tenant: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def check(self, tenant_id: str) -> None:
        """Raise LimitReached when one more connection for ``tenant_id`` would be too many."""
        if self.total >= self.max_total:
            raise LimitReached("This server has reached its connection limit.")
        if self._by_tenant[tenant_id] >= self.max_per_tenant:
            raise LimitReached("This tenant has reached its connection limit.")

    @contextlib.contextmanager
    def hold(self, kind: str, tenant_id: str) -> Iterator[None]:
        self.check(tenant_id)
        self.by_kind[kind] += 1
        self._by_tenant[tenant_id] += 1
        try:
            yield
        finally:
            self.by_kind[kind] -= 1
            self._by_tenant[tenant_id] -= 1
            if not self._by_tenant[tenant_id]:
                del self._by_tenant[tenant_id]
