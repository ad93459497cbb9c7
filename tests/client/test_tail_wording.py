"""`pulse tail` says the same over SSE and the WebSocket: the same status and code, and for
a refusal a sentence (the server's own over SSE, the contract's over the WebSocket).

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


@pytest.mark.parametrize(
    ("lifetime_s", "token", "code", "over_sse"),
    [
        (-3600, None, "token_expired", "The token has expired."),
        (None, "not-a-jwt", "invalid_token", "The token is not a well-formed JWT."),
    ],
)
async def test_a_refused_token_has_the_same_status_and_code_over_both_transports(
    server: str,
    make_token: Callable[..., str],
    lifetime_s: int | None,
    token: str | None,
    code: str,
    over_sse: str,
) -> None:
    """As docs/client.md says (the first-ten-minutes audit found it promising the same
    line): over SSE the server's own sentence, which may say more; over the WebSocket,
    whose close carries only the code, the contract's sentence for it."""
    token = token or make_token("t1", lifetime_s=lifetime_s)
    said = []
    for transport in TRANSPORTS:
        async with pulse_tail("--url", server, "--token", token, "--transport", transport) as tail:
            assert await tail.exit_status(within=30) == 1
            said.append(tail.stderr)
    assert said == [
        f"pulse tail: 401 {code}: {over_sse}\n",
        f"pulse tail: 401 {code}: {CLOSE_SENTENCES[code]}\n",
    ]


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
