"""A token as it comes from a file or a CRLF .env file, and one that cannot be a token.

From the client review of 8 December (finding 3): a token with its line ending
(``open("token").read()``, ``PULSE_TOKEN`` from a CRLF file) made httpx and websockets
refuse the Authorization header before sending it. The streams took that for a lost
connection and retried for ever, each notice quoting the whole token; the REST
helpers raised httpx's LocalProtocolError, quoting it too; and ``pulse tail``,
``export`` and ``simulate`` said "cannot reach" with the token on stderr. Now the
whitespace around a token is dropped, and a token that still holds a character no
token holds is refused at once, in a message that never quotes it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable

import asyncpg
import pytest

from pulse.cli import build_parser
from pulse.client import AuthenticationFailed, Notice, PulseClient
from pulse.config import Settings
from tests.support import insert_readings, provision_device, running_server

pytestmark = pytest.mark.timeout(60)

SECRET_PART = "s3cr3t-part-of-the-token"


@pytest.fixture
async def server(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    await provision_device(pool, "t1", "d1")
    await insert_readings(pool, "t1", [("d1", {"temp": 21.5})])
    async with running_server(settings) as url:
        yield url


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r", " \t\n"])
async def test_a_token_read_from_a_file_works_everywhere(
    server: str, make_token: Callable[..., str], ending: str
) -> None:
    notices: list[Notice] = []
    async with PulseClient(server, make_token("t1") + ending, on_notice=notices.append) as client:
        assert (await client.fleet_summary()).total == 1  # before: LocalProtocolError
        async with asyncio.timeout(20):  # before: retried for ever
            for stream in (client.sse(last_event_id=0), client.websocket(last_event_id=0)):
                async with stream:
                    event = await anext(aiter(stream))
                    assert (event.id, event.device_id) == (1, "d1")
    assert [n.kind for n in notices] == ["connected", "connected"], notices


@pytest.mark.parametrize(
    ("inner", "said"),
    [
        ("\r\n", "a carriage return (U+000D) at character 11"),
        (" ", "a space (U+0020) at character 11"),
        ("\x1b", "a control character (U+001B)"),
        ("\u00e9", "a non-ASCII character (U+00E9)"),
    ],
)
def test_a_token_that_cannot_be_one_is_refused_without_being_quoted(inner: str, said: str) -> None:
    token = "header.cla" + inner + SECRET_PART
    with pytest.raises(ValueError) as refused:
        PulseClient("http://127.0.0.1:9", token)
    message = str(refused.value)
    assert message.startswith("the token holds ") and said in message, message
    assert SECRET_PART not in message and "header.cla" not in message
    for empty in ("", " \r\n"):
        with pytest.raises(ValueError, match=r"^the token is empty$"):
            PulseClient("http://127.0.0.1:9", empty)


async def test_a_refresh_callback_s_token_is_cleaned_and_a_bad_one_raised_once(
    server: str, make_token: Callable[..., str]
) -> None:
    async with PulseClient(server, refresh_token=lambda: make_token("t1") + "\r\n") as client:
        assert (await client.fleet_summary()).total == 1
    calls: list[str] = []

    async def broken() -> str:
        calls.append("called")
        return make_token("t1")[:20] + "\n" + SECRET_PART

    notices: list[Notice] = []
    async with PulseClient(server, refresh_token=broken, on_notice=notices.append) as client:
        with pytest.raises(AuthenticationFailed) as refused:
            await client.fleet_summary()
        assert refused.value.status == 0 and refused.value.code == "invalid_token"
        assert "the token refresh_token returned holds a line feed" in str(refused.value)
        for stream in (client.sse(), client.websocket(), client.v2(fleet=True)):
            with pytest.raises(AuthenticationFailed) as raised:  # before: retried for ever
                async with asyncio.timeout(20):
                    async for _ in stream:
                        pass
            assert SECRET_PART not in str(raised.value)
    assert len(calls) == 4  # once a call: never retried
    assert SECRET_PART not in str(refused.value) and notices == []


@pytest.mark.parametrize("command", [["tail"], ["export", "--device", "d1"], ["simulate"]])
def test_the_commands_refuse_such_a_pulse_token_in_one_line_without_it(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PULSE_TOKEN", "header.claims\r\n" + SECRET_PART + "\r\n")
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(command)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert SECRET_PART not in err
    assert err.splitlines()[-1] == (
        f"pulse {command[0]}: error: argument --token: the token (--token, or PULSE_TOKEN) "
        "holds a carriage return (U+000D) at character 14 of 39: a token is printable ASCII "
        "without spaces (a JWT: three base64url parts joined by dots). Is it one token, whole?"
    )
    monkeypatch.setenv("PULSE_TOKEN", "a.jwt.token\r\n")
    assert build_parser().parse_args(command).token == "a.jwt.token"


async def test_pulse_tail_and_export_work_with_a_pulse_token_from_a_crlf_file(
    server: str, make_token: Callable[..., str]
) -> None:
    env = {**os.environ, "PULSE_URL": server, "PULSE_TOKEN": make_token("t1") + "\r\n"}
    window = ["--from", "2000-01-01T00:00:00Z", "--to", "2100-01-01T00:00:00Z"]
    tail = ["tail", "--from-id", "0", "--count", "1", "--connect-timeout", "10"]
    for argv, expected, said in [
        (tail, b'"id":1,', b"# connected: SSE, after event 0\n"),
        (["export", "--device", "d1", "--format", "ndjson", *window], b'{"id":1,', b""),
    ]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pulse", *argv, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert (proc.returncode, err) == (0, said), (argv, err)
        assert expected in out, out
