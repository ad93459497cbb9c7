"""Event ids foreseen, so that a tenant's next write inserts while the one ahead commits.

Ids follow commit order because a write reserves them by updating its tenant's row
(``pulse_reserve_event_ids``), which stays locked until the write commits: the
tenant's next write cannot reserve until then. It used to reserve first and then
insert, so the insert, most of a write's time in PostgreSQL, was serial per tenant.

This process knows, for each tenant it writes, what the tenant's last id will be
once the writes it has in flight commit. A write may take the ids after that,
insert its rows under them at once, beside the write ahead, and reserve last: once
the writes it foresaw after have ended, it reserves as before and checks that the
base it gets is the one it foresaw. Only then do its ids count; a wrong guess (a
write ahead failed, or another process took ids of the tenant) rolls the whole
transaction back, and the write is made again reserving first. So the guarantee is
the reservation's, exactly as before: the foresight only decides how much of the
work is done before the lock.

After a guess that another writer made wrong, the tenant's writes reserve first for
``DOUBT_SECONDS``: processes that write the same tenant each lose about one insert
per that time to it, instead of one per write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable

DOUBT_SECONDS = 1.0


@dataclasses.dataclass(slots=True)
class Claim:
    """One transaction's ids, foreseen or reserved: ``bases[t] + 1`` is tenant t's first."""

    bases: dict[str, int]
    ahead: list[asyncio.Future[bool]]  # the writes foreseen after: True once committed
    ended: asyncio.Future[bool]


class EventIds:
    """Each tenant's last id as this process foresees it, and the writes in flight."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, int] = {}  # once every write in flight has committed
        self._tail: dict[str, asyncio.Future[bool]] = {}  # the newest write in flight
        self._doubt: dict[str, float] = {}  # until when a tenant's writes reserve first
        self.foreseen = 0  # writes that inserted before they reserved
        self.wrong = 0  # of those, the ones made again

    def foresee(self, counts: dict[str, int], ended: asyncio.Future[bool]) -> Claim | None:
        """The ids of a write of ``counts`` readings per tenant, taken after those of the
        writes in flight; None when some tenant's are not known (reserve first)."""
        now = self._clock()
        for tenant in counts:
            if tenant not in self._last:
                return None
            if (until := self._doubt.get(tenant)) is not None:
                if until > now:
                    return None
                del self._doubt[tenant]
        bases = {tenant: self._last[tenant] for tenant in counts}
        self.foreseen += 1
        return self._follow(counts, bases, ended)

    def reserved(
        self, counts: dict[str, int], bases: dict[str, int], ended: asyncio.Future[bool]
    ) -> Claim:
        """A write that reserved first: the ids after its own can be foreseen now."""
        return self._follow(counts, bases, ended)

    def _follow(
        self, counts: dict[str, int], bases: dict[str, int], ended: asyncio.Future[bool]
    ) -> Claim:
        ahead = []
        for tenant, base in bases.items():
            if (tail := self._tail.get(tenant)) is not None and not tail.done():
                ahead.append(tail)
            self._tail[tenant] = ended
            self._last[tenant] = base + counts[tenant]
        return Claim(bases, ahead, ended)

    def end(self, claim: Claim, *, committed: bool) -> None:
        """A write's transaction is over. If it did not commit, every id foreseen after
        its own is wrong: those writes will find out, and the next reserve first."""
        if not claim.ended.done():
            claim.ended.set_result(committed)
        for tenant in claim.bases:
            if not committed:
                self._last.pop(tenant, None)
            if self._tail.get(tenant) is claim.ended:
                del self._tail[tenant]

    def proven_wrong(self, claim: Claim, *, by_another: bool) -> None:
        """A write's foresight was wrong: it is rolled back, to be made again. When
        another writer took the ids (not a write ahead that failed), the tenants'
        writes reserve first for a while."""
        self.wrong += 1
        self.end(claim, committed=False)
        if by_another:
            until = self._clock() + DOUBT_SECONDS
            for tenant in claim.bases:
                self._doubt[tenant] = until

    def __len__(self) -> int:
        return len(self._last)
