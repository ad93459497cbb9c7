"""Event ids foreseen, so that a tenant's next write inserts while the one ahead commits.

Ids follow commit order because a write reserves them by updating its tenant's row
(``pulse_reserve_event_ids``), which stays locked until the write commits: the
tenant's next write cannot reserve until then. It used to reserve first and then
insert, so the insert, most of a write's time in PostgreSQL, was serial per tenant.

This process knows, for each tenant it writes, what the tenant's last id will be
once the writes it has in flight commit. A write may take the ids after that,
insert its rows under them at once, beside the write ahead, and reserve last: once
the writes it foresaw after hold their tenants' rows (their reservations gave the
ids they claimed), it reserves as before, which waits in PostgreSQL until they have
ended, and checks that the base it gets is the one it foresaw. Only then do its ids
count; a wrong guess (a write ahead failed, or another process took ids of the
tenant) rolls the whole transaction back, and the write is made again reserving
first. So the guarantee is the reservation's, exactly as before: the foresight only
decides how much of the work is done before the lock. Waiting for the row in
PostgreSQL, not for the write ahead's COMMIT to come back to this process, means the
lock passes from one write to the next without a round trip through the event loop.

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


@dataclasses.dataclass(slots=True, eq=False)
class Claim:
    """One transaction's ids, foreseen or reserved: ``bases[t] + 1`` is tenant t's first."""

    bases: dict[str, int]
    ahead: list[Claim]  # the writes foreseen after
    ended: asyncio.Future[bool]  # True once committed, False once rolled back
    # True once its reservation gave these ids: it holds its tenants' rows until it
    # ends. False if it never will.
    holds: asyncio.Future[bool]


class EventIds:
    """Each tenant's last id as this process foresees it, and the writes in flight."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last: dict[str, int] = {}  # once every write in flight has committed
        self._tail: dict[str, Claim] = {}  # the newest write in flight
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
        claim = self._follow(counts, bases, ended)
        claim.holds.set_result(True)
        return claim

    def _follow(
        self, counts: dict[str, int], bases: dict[str, int], ended: asyncio.Future[bool]
    ) -> Claim:
        ahead: list[Claim] = []
        claim = Claim(bases, ahead, ended, ended.get_loop().create_future())
        for tenant, base in bases.items():
            if (tail := self._tail.get(tenant)) is not None and not tail.ended.done():
                ahead.append(tail)
            self._tail[tenant] = claim
            self._last[tenant] = base + counts[tenant]
        return claim

    def hold(self, claim: Claim) -> None:
        """A foreseen write's reservation gave the ids it claimed: the writes behind it
        may reserve (they wait in PostgreSQL until it ends)."""
        if not claim.holds.done():
            claim.holds.set_result(True)

    def end(self, claim: Claim, *, committed: bool) -> None:
        """A write's transaction is over. If it did not commit, every id foreseen after
        its own is wrong: those writes will find out, and the next reserve first."""
        if not claim.holds.done():
            claim.holds.set_result(False)
        if not claim.ended.done():
            claim.ended.set_result(committed)
        claim.ahead.clear()  # a chain of claims ends with the writes in flight
        for tenant in claim.bases:
            if not committed:
                self._last.pop(tenant, None)
            if self._tail.get(tenant) is claim:
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
