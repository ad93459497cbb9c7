"""Redeeming stream tickets (pulse.auth.tickets) against the database: once, and only once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from pulse.auth.principal import Principal
from pulse.auth.tickets import issue_ticket, redeem_ticket
from pulse.db.database import Database
from pulse.errors import ApiError

ALICE = Principal(
    subject="alice",
    tenant_id="t1",
    roles=frozenset({"customer"}),
    expires_at=datetime.now(UTC) + timedelta(hours=1),
)


async def test_of_many_concurrent_redeemers_one_gets_the_ticket(db: Database) -> None:
    ticket = await issue_ticket(db, ALICE)
    outcomes = await asyncio.gather(
        *(redeem_ticket(db, ticket) for _ in range(8)), return_exceptions=True
    )
    [principal] = [o for o in outcomes if isinstance(o, Principal)]
    assert principal == ALICE
    refused = [o for o in outcomes if not isinstance(o, Principal)]
    assert len(refused) == 7
    assert all(isinstance(o, ApiError) and o.error.code == "invalid_ticket" for o in refused)


async def test_a_refused_redemption_puts_the_ticket_back_as_it_was(db: Database) -> None:
    ticket = await issue_ticket(db, ALICE)
    [before] = await db.fetch("SELECT * FROM stream_tickets")

    class Refused(Exception):
        pass

    def refuse(_: Principal) -> None:
        raise Refused

    with pytest.raises(Refused):
        await redeem_ticket(db, ticket, refuse)
    assert await db.fetch("SELECT * FROM stream_tickets") == [before]
    assert await redeem_ticket(db, ticket) == ALICE
    assert await db.fetchval("SELECT count(*) FROM stream_tickets") == 0
