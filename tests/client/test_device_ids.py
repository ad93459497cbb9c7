"""A device id goes into the URL's path as one segment, or not at all.

From the client review of 8 December (finding 6): the client pasted the id into the
path as given. `h2?x=1` or `../devices` reached other endpoints, and httpx removed `.`
and `..`, so that another endpoint answered about its own parameters ("Unknown
parameter 'bucket'; this endpoint takes tenant_id."). Now an id that is none is a
ValueError before any request, and a valid one is percent-encoded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from pulse.client import PulseClient, PulseClientError
from pulse.config import Settings
from tests.support import insert_readings, provision_device, running_server

pytestmark = pytest.mark.timeout(60)

NOT_IDS = ["h2?x=1", "../devices", "..", ".", "a/b", "d 1", "d%2F1", "", "x" * 65, "d1\n"]


@contextlib.asynccontextmanager
async def recording(lines: list[bytes]) -> AsyncIterator[str]:
    """A server on a loopback port that keeps each request's first line and answers 404."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            head = await reader.readuntil(b"\r\n\r\n")
            lines.append(head.split(b"\r\n")[0])
            body = b'{"error": "unknown_device", "detail": "No such device."}'
            writer.write(
                b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def reads(client: PulseClient, device_id: str) -> dict[str, Callable[[], Any]]:
    return {
        "history": lambda: client.history(device_id),
        "iter_readings": lambda: anext(aiter(client.iter_readings(device_id))),
        "export": lambda: anext(aiter(client.export(device_id))),
    }


@pytest.mark.parametrize("not_an_id", NOT_IDS)
async def test_an_id_that_is_none_is_refused_before_any_request(not_an_id: str) -> None:
    lines: list[bytes] = []
    async with recording(lines) as url, PulseClient(url, "any-token") as client:
        for name, call in reads(client, not_an_id).items():
            with pytest.raises(ValueError, match="is not a device id: 1 to 64 of") as refused:
                await call()
            assert repr(not_an_id)[:20] in str(refused.value), name
    assert lines == []  # before: sent, to whichever endpoint the path then named


async def test_an_id_is_one_path_segment() -> None:
    lines: list[bytes] = []
    async with recording(lines) as url, PulseClient(url, "any-token") as client:
        for call in reads(client, "site:a.b-1").values():
            with pytest.raises(PulseClientError, match="unknown_device"):
                await call()
    assert {line.split(b"?")[0] for line in lines} == {
        b"GET /api/v1/customer/devices/site%3Aa.b-1/telemetry"
    }


@pytest.fixture
async def server(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[str]:
    await provision_device(pool, "t1", "site:a.b-1")
    await insert_readings(pool, "t1", [("site:a.b-1", {"temp": 21.5})])
    async with running_server(settings) as url:
        yield url


async def test_pulse_reads_an_encoded_id_as_the_device(
    server: str, make_token: Callable[..., str]
) -> None:
    async with PulseClient(server, make_token("t1")) as client:
        history = await client.history("site:a.b-1", bucket="1m")
        assert history.last_event_id == 1 and list(history.series) == ["temp"]
        assert [r.id async for r in client.iter_readings("site:a.b-1")] == [1]
        export = b"".join([chunk async for chunk in client.export("site:a.b-1")])
        assert export.startswith(b"id,time,metric,value\r\n1,") and b",temp,21.5\r\n" in export
