"""Redeeming stream tickets (pulse.auth.tickets) against the database: once, and only once."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from datetime import UTC, datetime, timedelta

import pytest

from pulse.auth.principal import Principal
from pulse.auth.tickets import Tickets
from pulse.db.database import Database
from pulse.errors import ApiError

ALICE = Principal(
    subject="alice",
    tenant_id="t1",
    roles=frozenset({"customer"}),
    expires_at=datetime.now(UTC) + timedelta(hours=1),
)


async def test_of_many_concurrent_redeemers_one_gets_the_ticket(db: Database) -> None:
    tickets = Tickets(db)
    ticket = await tickets.issue(ALICE)
    outcomes = await asyncio.gather(
        *(tickets.redeem(ticket) for _ in range(8)), return_exceptions=True
    )
    [principal] = [o for o in outcomes if isinstance(o, Principal)]
    assert principal == ALICE
    refused = [o for o in outcomes if not isinstance(o, Principal)]
    assert len(refused) == 7
    assert all(isinstance(o, ApiError) and o.error.code == "invalid_ticket" for o in refused)


async def test_a_refused_redemption_puts_the_ticket_back_as_it_was(db: Database) -> None:
    tickets = Tickets(db)
    ticket = await tickets.issue(ALICE)
    [before] = await db.fetch("SELECT * FROM stream_tickets")

    class Refused(Exception):
        pass

    def refuse(_: Principal) -> None:
        raise Refused

    with pytest.raises(Refused):
        await tickets.redeem(ticket, refuse)
    assert await db.fetch("SELECT * FROM stream_tickets") == [before]
    assert await tickets.redeem(ticket) == ALICE
    assert await db.fetchval("SELECT count(*) FROM stream_tickets") == 0


async def test_redeemers_of_one_ticket_in_separate_services_one_wins(db: Database) -> None:
    """As two processes would: each its own statements, racing in the database."""
    ticket = await Tickets(db).issue(ALICE)
    outcomes = await asyncio.gather(
        *(Tickets(db).redeem(ticket) for _ in range(6)), return_exceptions=True
    )
    assert [o for o in outcomes if isinstance(o, Principal)] == [ALICE]


async def test_tickets_asked_for_at_once_share_statements(db: Database) -> None:
    tickets = Tickets(db)
    principals = [
        Principal(
            subject=f"user-{n}",
            tenant_id=f"t{n % 3}",
            roles=frozenset({"customer", "viewer"} if n % 2 else {"operator"}),
            expires_at=ALICE.expires_at,
        )
        for n in range(200)
    ]
    issued = await asyncio.gather(*(tickets.issue(p) for p in principals))
    assert len(set(issued)) == 200
    assert tickets._insert.statements < 20  # 200 callers, a handful of statements
    redeemed = await asyncio.gather(*(tickets.redeem(t) for t in reversed(issued)))
    assert redeemed == list(reversed(principals))  # each caller its own identity
    assert tickets._take.statements < 20
    assert await db.fetchval("SELECT count(*) FROM stream_tickets") == 0


async def test_a_ticket_lives_30_seconds_and_never_past_its_token(db: Database) -> None:
    soon = datetime.now(UTC) + timedelta(seconds=5)
    tickets = Tickets(db)
    await asyncio.gather(
        tickets.issue(ALICE), tickets.issue(dataclasses.replace(ALICE, expires_at=soon))
    )
    lives = await db.fetch(
        "SELECT token_expires_at, expires_at - clock_timestamp() AS left FROM stream_tickets"
        " ORDER BY token_expires_at"
    )
    assert [row["token_expires_at"] for row in lives] == [soon, ALICE.expires_at]
    assert lives[0]["left"] <= timedelta(seconds=5)
    assert timedelta(seconds=25) < lives[1]["left"] <= timedelta(seconds=30)


@pytest.mark.parametrize(
    "ticket",
    [
        "pst_never-issued",
        "pst_" + "A" * 42,
        "pst_" + "A" * 44,
        "pst_" + "A" * 96,  # under the 100 characters that were the only other bound
        "pst_" + "A" * 42 + "=",
        "pst_" + "A" * 42 + ".",
        "pst_" + "A" * 42 + "\u00e9",
        "pst_" + "A" * 43 + "\n",
        "PST_" + "A" * 43,
        "tkt_" + "A" * 43,
    ],
)
async def test_a_ticket_not_of_the_issued_shape_costs_no_query(db: Database, ticket: str) -> None:
    """Each lookup is a write transaction (DELETE ... RETURNING), for anyone: a ticket
    that cannot be one of ours is refused before it (security audit, L1)."""
    tickets = Tickets(db)
    with pytest.raises(ApiError) as info:
        await tickets.redeem(ticket)
    assert info.value.code == "invalid_ticket"
    assert tickets._take.statements == 0


async def test_a_well_shaped_unknown_ticket_costs_one_query(db: Database) -> None:
    tickets = Tickets(db)
    issued = await tickets.issue(ALICE)
    for ticket in ("pst_" + secrets.token_urlsafe(32), "pst_" + "-" * 43):
        with pytest.raises(ApiError) as info:
            await tickets.redeem(ticket)
        assert info.value.code == "invalid_ticket"
    assert tickets._take.statements == 2
    assert await tickets.redeem(issued) == ALICE
