"""What answers is not always Pulse, and stdout is not always there.

Found by an audit of the client and its commands: a URL that reached a page (a 200 of
HTML) was taken for a live SSE stream, and `pulse tail` reconnected four times a second
for ever; an event that was not Pulse's escaped as a traceback; `pulse export` wrote a
page as an export, and printed a traceback into a closed pipe or a full disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import asyncpg
import pytest
from websockets.asyncio.server import ServerConnection, serve

from pulse.client import PulseClient
from pulse.client.errors import Forbidden, NotPulse
from pulse.config import Settings
from tests.history.readings import many_readings
from tests.support import TEST_SECRET, provision_device, running_server

pytestmark = pytest.mark.timeout(60)

PAGE = b"<!doctype html><title>not Pulse</title>"


@contextlib.asynccontextmanager
async def answering(
    status_line: bytes,
    content_type: bytes,
    body: bytes,
    *,
    more: bytes = b"",
    asked: list[float] | None = None,
) -> AsyncIterator[str]:
    """A server on a loopback port that answers every request the same (``more``: header
    lines; ``asked``: when each request came)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if asked is not None:
                asked.append(time.monotonic())
            writer.write(
                b"HTTP/1.1 " + status_line + b"\r\ncontent-type: " + content_type + more
                + b"\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body
            )  # fmt: skip
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def started(*argv: str, stdout: int | None) -> asyncio.subprocess.Process:
    """`pulse *argv` with a secret to mint tokens, its stderr piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pulse", *argv,
        env={**os.environ, "PULSE_JWT_SECRET": TEST_SECRET},
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def command(*argv: str, stdout: int | None = asyncio.subprocess.PIPE) -> tuple[int, str]:
    proc = await started(*argv, stdout=stdout)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


@pytest.mark.parametrize(
    ("content_type", "body", "said"),
    [
        (b"text/html", PAGE, "answered text/html, not text/event-stream"),
        (b"text/event-stream", b"data: {not json\n\n", "an event Pulse does not send"),
        (b"text/event-stream", b'data: {"foo": 1}\n\n', "an event Pulse does not send"),
    ],
)
async def test_a_stream_from_something_else_is_refused_for_good(
    content_type: bytes, body: bytes, said: str
) -> None:
    async with answering(b"200 OK", content_type, body) as url:
        async with PulseClient(url, "any-token") as client:
            with pytest.raises(NotPulse) as refused:
                async with asyncio.timeout(10):
                    async for _ in client.sse():
                        pass
        assert said in str(refused.value)
        started = time.monotonic()
        status, err = await command("tail", "--url", url, "--token", "x", "--connect-timeout", "5")
        last = err.splitlines()[-1]
        assert status == 1 and last.startswith("pulse tail: 200 not_pulse: "), err
        assert said in last and "Traceback" not in err
        assert time.monotonic() - started < 20  # it did not wait for ever


async def test_an_export_from_something_else_is_refused() -> None:
    async with answering(b"200 OK", b"text/html", PAGE) as url:
        status, err = await command(
            "export", "--url", url, "--token", "x", "--device", "d1", "--resume", "0"
        )
    assert status == 1, err
    assert "answered text/html, not text/csv" in err and "Traceback" not in err


@pytest.fixture
async def server(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    await provision_device(pool, "t1", "d1")
    await many_readings(pool, "t1", "d1", 20_000, datetime(2026, 12, 1, tzinfo=UTC))
    async with running_server(settings) as url:
        yield url


async def test_pulse_export_into_a_closed_pipe_or_a_full_disk(
    server: str, make_token: Callable[..., str]
) -> None:
    window = ["--from", "2026-12-01T00:00:00Z", "--to", "2026-12-02T00:00:00Z"]
    argv = ["export", "--url", server, "--tenant", "t1", "--device", "d1", *window]
    # `pulse export ... | head -n 3`: the reader goes, the export ends quietly.
    read, write = os.pipe()
    proc = await started(*argv, stdout=write)
    os.close(write)
    with os.fdopen(read, "rb") as reader:
        assert (await asyncio.to_thread(reader.readline)).startswith(b"id,time")
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, err) == (0, b"")
    # A full disk: one line, and a status that says it failed.
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        status, said = await command(*argv, stdout=full)
        assert status == 1 and said.startswith("pulse export: cannot write to stdout: "), said
        assert "Traceback" not in said
        status, said = await command("token", "--tenant", "t1", stdout=full)
        assert status == 1 and said.startswith("pulse token: cannot write the token: "), said
    finally:
        os.close(full)


async def test_an_sse_stream_of_no_device_is_refused_not_every_device() -> None:
    """From the client audit: sse(device_ids=[]) streamed every device (the URL cannot
    say none), where websocket(device_ids=[]) streams none."""
    async with PulseClient("http://127.0.0.1:9", "any-token") as client:
        for empty in ([], [""]):
            with pytest.raises(ValueError, match="no device id"):
                client.sse(device_ids=empty)


async def test_a_refused_websocket_handshake_says_why_and_waits_as_asked() -> None:
    """From the client audit: a 403 or 400 to the handshake was a plain PulseClientError
    (SSE raises Forbidden, BadRequest), and a 503's Retry-After was not waited for (six
    attempts in 8 s against Retry-After: 5)."""
    forbidden = answering(b"403 Forbidden", b"application/json", b"{}")
    async with forbidden as url, PulseClient(url, "any-token") as client:
        with pytest.raises(Forbidden):
            async with asyncio.timeout(10), client.websocket() as stream:
                async for _ in stream:
                    pass
    asked: list[float] = []
    busy = answering(
        b"503 Service Unavailable", b"application/json", b"{}", more=b"\r\nretry-after: 2",
        asked=asked,
    )  # fmt: skip
    async with busy as url, PulseClient(url, "any-token") as client:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5), client.websocket() as stream:
                async for _ in stream:
                    pass
    assert 2 <= len(asked) <= 3, asked
    assert all(b - a >= 2 for a, b in itertools.pairwise(asked)), asked


@contextlib.asynccontextmanager
async def other_websocket_service(greeting: str) -> AsyncIterator[str]:
    """A WebSocket service that is not Pulse, on a loopback port: it takes any path,
    sends ``greeting`` and stays until the client goes."""

    async def greet(ws: ServerConnection) -> None:
        await ws.send(greeting)
        await ws.wait_closed()

    async with serve(greet, "127.0.0.1", 0) as service:
        port = service.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("greeting", "said"),
    [
        ("hello", "sent a message that is not JSON"),
        # Vite's HMR socket: was a KeyError ('last_event_id') out of the stream.
        ('{"type":"connected"}', "sent a 'connected' message Pulse does not send (KeyError"),
        ('["connected"]', "sent a message Pulse does not send"),
    ],
)
async def test_a_websocket_service_that_is_not_pulse_is_refused_for_good(
    greeting: str, said: str
) -> None:
    """From the client review of 8 December (finding 4): the WebSocket streams raised
    orjson's JSONDecodeError or a KeyError, and `pulse tail --transport ws` died with a
    traceback, where SSE says "is the URL Pulse's?"."""
    async with other_websocket_service(greeting) as url:
        async with PulseClient(url, "any-token") as client:
            with pytest.raises(NotPulse) as refused:
                async with asyncio.timeout(10), client.websocket() as stream:
                    async for _ in stream:
                        pass
            assert said in str(refused.value) and "is the URL Pulse's?" in str(refused.value)
            # The v2 channels: a message of no type they have is another service's too.
            with pytest.raises(NotPulse, match="is the URL Pulse's"):
                async with asyncio.timeout(10), client.v2(fleet=True) as v2:
                    async for _ in v2:
                        pass
        status, err = await command(
            "tail", "--url", url, "--token", "x", "--transport", "ws", "--connect-timeout", "5"
        )
    assert status == 1 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("pulse tail: 200 not_pulse: the WebSocket sent ") and said in last


@pytest.mark.parametrize(
    ("status_line", "said"),
    [
        (b"200 OK", "answered 200, not a WebSocket handshake of Pulse's"),  # was retried
        (b"404 Not Found", "answered 404, not a WebSocket handshake of Pulse's"),
    ],
)
async def test_a_page_where_a_websocket_was_asked_for_is_not_pulse(
    status_line: bytes, said: str
) -> None:
    page = answering(status_line, b"text/html", PAGE)
    async with page as url, PulseClient(url, "any-token") as client:
        with pytest.raises(NotPulse) as refused:
            async with asyncio.timeout(10), client.websocket() as stream:
                async for _ in stream:
                    pass
    assert said in str(refused.value) and "is the URL Pulse's?" in str(refused.value)
    assert refused.value.status == int(status_line[:3])


@pytest.mark.parametrize(
    ("content_type", "body", "said"),
    [
        (b"text/html", PAGE, "answered text/html, not application/json: is the URL Pulse's?"),
        (b"application/json", b'{"ok": true}', "answered JSON Pulse does not send (KeyError"),
        (b"application/json", b"[]", "answered JSON Pulse does not send (TypeError"),
        (b"application/json", b"{not json", "answered JSON Pulse does not send (JSONDecodeErr"),
    ],
)
async def test_the_rest_helpers_say_what_answered_is_not_pulse(
    content_type: bytes, body: bytes, said: str
) -> None:
    """From the client review of 8 December (finding 5): a dev server's catch-all page
    (200 text/html for everything) made fleet_summary(), history() and alerts() raise
    json's JSONDecodeError; a JSON answer of another shape, a KeyError."""
    other = answering(b"200 OK", content_type, body)
    async with other as url, PulseClient(url, "any-token", busy_wait_s=0) as client:
        calls = {
            "fleet_summary": client.fleet_summary,
            "alerts": client.alerts,
            "history": lambda: client.history("d1"),
            "fleet_history": lambda: client.fleet_history("temp"),
            "iter_readings": lambda: anext(aiter(client.iter_readings("d1"))),
            "acknowledge_alert": lambda: client.acknowledge_alert(1),
        }
        for name, call in calls.items():
            with pytest.raises(NotPulse) as refused:
                await call()
            assert said in str(refused.value), (name, str(refused.value))
            assert refused.value.code == "not_pulse"


async def test_a_page_not_found_is_not_printed_as_the_error() -> None:
    """From the client review of 8 December (finding 5): against another server's 404
    page (`python -m http.server`), `pulse tail` and `pulse export` printed the page as
    the error (`pulse tail: 404 404: <!DOCTYPE HTML> <html lang="en"> ...`)."""
    async with answering(b"404 Not Found", b"text/html", PAGE) as url:
        async with PulseClient(url, "any-token") as client:
            with pytest.raises(NotPulse) as refused:
                async with asyncio.timeout(10), client.sse() as stream:
                    async for _ in stream:
                        pass
        assert refused.value.status == 404
        tail = await command("tail", "--url", url, "--token", "x", "--connect-timeout", "5")
        export = await command("export", "--url", url, "--token", "x", "--device", "d1")
    for (status, err), path in [(tail, "/stream/sse"), (export, "/devices/d1/telemetry")]:
        assert status == 1 and len(err.splitlines()) == 1, err
        assert path in err and "404 not_pulse: " in err, err
        assert err.endswith(
            " answered 404 with text/html, not Pulse's JSON error: is the URL Pulse's?\n"
        )
        assert "<title>" not in err
