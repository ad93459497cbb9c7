"""One-time stream tickets (CONTRACT section 7).

A client that holds a JWT trades it for a ticket and opens a stream with
``?ticket=`` instead of ``?token=``, so that long-lived tokens stay out of URLs
and access logs. A ticket is random, lives 30 seconds, works once on any
process of the cluster (it is kept in PostgreSQL, as a hash), and stands for
the identity and expiry of the token it was issued for. Tickets issued or
redeemed at the same time go to the database together, one statement for many.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from typing import Any

from pulse.auth.principal import Principal
from pulse.db.batch import Batched
from pulse.db.database import Database
from pulse.db.queries import load_queries
from pulse.errors import INVALID_TICKET, ApiError

Q = load_queries(__package__)

TICKET_TTL_S = 30
_PREFIX = "pst_"
_RANDOM_BYTES = 32
# The shape ``issue`` gives every ticket: the prefix, then 32 random bytes in unpadded
# base64url. Anything else is no ticket of ours, and is refused without a query (each
# lookup is a write transaction, a DELETE: made-up tickets cost one each).
_SHAPE = re.compile(r"pst_[A-Za-z0-9_-]{43}")


class Tickets:
    """Issues and redeems tickets; those asked for at once share one statement
    (``pulse.db.batch``), as every dashboard does after a deploy."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._insert: Batched[tuple[bytes, Principal], None] = Batched(self._insert_many)
        self._take: Batched[bytes, Any] = Batched(self._take_many)  # a row, or None

    async def issue(self, principal: Principal) -> str:
        ticket = _PREFIX + secrets.token_urlsafe(_RANDOM_BYTES)
        await self._insert((_hash(ticket), principal))
        return ticket

    async def redeem(
        self, ticket: str, accept: Callable[[Principal], object] = lambda _: None
    ) -> Principal:
        """The identity a ticket stands for, once ``accept`` has taken it; it cannot be
        used again.

        ``accept`` checks what the request asks of that identity (its tenant, its
        parameters) and raises to refuse it: a refused request leaves the ticket
        unspent, for the corrected request (a redeemer of the same ticket meanwhile
        finds it gone). Raises invalid_ticket.
        """
        if not is_well_shaped(ticket):
            raise _invalid()
        # One statement takes the ticket (a round trip and a commit, where a transaction
        # that locked, then deleted it took four); a refusal puts it back.
        row = await self._take(_hash(ticket))
        if row is None:
            raise _invalid()
        principal = Principal(
            subject=row["subject"],
            tenant_id=row["tenant_id"],
            roles=frozenset(row["roles"]),
            expires_at=row["token_expires_at"],
        )
        try:
            accept(principal)
        except Exception:
            await self._db.execute(Q["restore_ticket"], *row.values())
            raise
        return principal

    async def _insert_many(self, tickets: list[tuple[bytes, Principal]]) -> list[None]:
        rows = [
            {
                "hash": ticket_hash.hex(),
                "subject": principal.subject,
                "tenant_id": principal.tenant_id,
                "roles": sorted(principal.roles),
                "token_expires_at": principal.expires_at,
            }
            for ticket_hash, principal in tickets
        ]
        await self._db.execute(Q["insert_tickets"], rows, float(TICKET_TTL_S))
        return [None] * len(tickets)

    async def _take_many(self, hashes: list[bytes]) -> list[Any]:
        taken = {row["ticket_hash"]: row for row in await self._db.fetch(Q["take_tickets"], hashes)}
        # A ticket asked for twice in one statement goes to the first asker only.
        return [taken.pop(ticket_hash, None) for ticket_hash in hashes]


def is_well_shaped(ticket: str) -> bool:
    """Whether ``ticket`` has the shape of the tickets ``Tickets.issue`` makes."""
    return _SHAPE.fullmatch(ticket) is not None


def _invalid() -> ApiError:
    return ApiError(
        INVALID_TICKET, "The ticket is unknown, already used or expired; request a new one."
    )


def _hash(ticket: str) -> bytes:
    # 256 random bits: a plain hash cannot be brute-forced.
    return hashlib.sha256(ticket.encode()).digest()
