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
