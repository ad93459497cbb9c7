"""`pulse tail` says the same over SSE and the WebSocket.

From the user-experience audit: an expired token ended SSE with `401 token_expired: The
token has expired; a stream needs one that has not.` and the WebSocket with only `401
token_expired`; a reset was printed as the whole WebSocket message (`{"type":"reset",...}`)
but as the SSE event's data only.
"""

from __future__ import annotations

from collections.abc import Callable

import asyncpg
import pytest

from pulse.client.errors import CLOSE_SENTENCES
from pulse.errors import CATALOGUE
from tests.client.tailproc import pulse_tail
from tests.support import insert_readings

pytestmark = pytest.mark.timeout(60)

TRANSPORTS = ("sse", "ws")


def test_the_client_knows_the_contracts_sentence_for_every_websocket_refusal() -> None:
    refusals = {e.code: e.meaning for e in CATALOGUE.values() if e.close in (4000, 4001, 4003)}
    assert refusals == CLOSE_SENTENCES


async def test_an_expired_token_is_said_the_same_way_over_both_transports(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await insert_readings(pool, "t1", [("d1", {"temp": 1.0})])
    # Expired, but within the leeway single requests allow: a stream refuses it.
    token = make_token("t1", lifetime_s=-5)
    said = []
    for transport in TRANSPORTS:
        async with pulse_tail("--url", server, "--token", token, "--transport", transport) as tail:
            assert await tail.exit_status(within=30) == 1
            said.append(tail.stderr)
    expected = "pulse tail: 401 token_expired: The token has expired (or did while connected).\n"
    assert said == [expected, expected]


async def test_a_reset_is_the_same_line_over_both_transports(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    await insert_readings(pool, "t1", [("d1", {"temp": 1.0})] * 3)  # ids 1 to 3
    said = []
    for transport in TRANSPORTS:
        async with pulse_tail(
            "--url", server, "--token", make_token("t1"), "--transport", transport,
            "--from-id", "1000",
        ) as tail:  # fmt: skip
            await tail.wait_for(lambda: "# reset" in tail.stderr, "the reset")
            assert await tail.stop() == 0
            said.append([line for line in tail.errors if line.startswith("# reset")])
    expected = ['# reset: {"reason":"unknown_position","last_event_id":3}\n']
    assert said == [expected, expected]
