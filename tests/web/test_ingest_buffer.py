"""Unfinished ingest bodies hold at most PULSE_INGEST_BUFFER_MB across the process.

A device's token is checked once its body is complete, so until then the bytes
belong to nobody known. Clients that declare 1 MiB and send all but the last
byte used to hold it until the 60 s body timeout, without limit; here they fill
a 2 MiB buffer, and whatever does not fit is refused at once with 503.
Loopback only, and bounded: three such clients.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.ingest.conftest import stored_rows
from tests.support import provision_device, running_server
from tests.web.test_ingest import BATCH, telemetry_url

pytestmark = pytest.mark.timeout(90)

MIB = 1024 * 1024
BUFFER = 2 * MIB


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    async with running_server(dataclasses.replace(settings, ingest_buffer_mb=2.0)) as url:
        yield url


async def buffered(http: httpx.AsyncClient) -> int:
    text = (await http.get("/metrics")).text
    match = re.search(r"^pulse_ingest_buffered_bytes (\S+)$", text, re.MULTILINE)
    assert match, "the gauge is exported"
    return int(float(match[1]))


async def until(http: httpx.AsyncClient, done: Callable[[int], bool], timeout: float = 20) -> int:
    """Poll the gauge until ``done``; it never exceeds the buffer meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        held = await buffered(http)
        assert held <= BUFFER, held
        if done(held):
            return held
        assert time.monotonic() < deadline, f"still {held} bytes held"
        await asyncio.sleep(0.02)


async def unfinished(url: str, path: str, token: str = "pdt_x") -> asyncio.StreamWriter:
    """A POST that declares 1 MiB and sends all of it but the last byte."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: pulse\r\nX-Provision-Token: {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {MIB}\r\n\r\n".encode()
        + b" " * (MIB - 1)
    )
    await writer.drain()
    writer.reader = reader  # type: ignore[attr-defined]
    return writer


async def test_unfinished_bodies_are_bounded_and_the_rest_refused_at_once(
    url: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    token = await provision_device(pool, "t1", "dev-1")
    reading = {"metrics": {"v": 1}}
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        # One through the device fast path, one through Quart (the batch route).
        holders = [await unfinished(url, telemetry_url()), await unfinished(url, BATCH)]
        await until(http, lambda held: held == 2 * (MIB - 1))

        # Full: a third is answered 503 before it has sent its body, and cut off.
        third = await unfinished(url, BATCH)
        head = await asyncio.wait_for(third.reader.readuntil(b"\r\n\r\n"), 10)  # type: ignore[attr-defined]
        assert head.startswith(b"HTTP/1.1 503"), head
        assert b"\r\nconnection: close\r\n" in head.lower()
        assert b"\r\nretry-after: 1\r\n" in head.lower()
        third.close()
        # And so is a whole, small batch, whose tokens are in its body.
        response = await http.post(
            BATCH,
            json={
                "messages": [
                    {"tenant_id": "t1", "device_id": "dev-1", "provision_token": token, **reading}
                ]
            },
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "server_busy"
        assert response.headers["Retry-After"] == "1"
        # Counted, for whoever watches /metrics (the operations audit found no count).
        text = (await http.get("/metrics")).text
        assert 'pulse_ingest_failed_total{error="server_busy"} 2.0' in text
        # From the abuse audit (HIGH): strangers' unfinished bodies refused every device
        # of every tenant. A device whose token is in its header has it checked before
        # its body is read, and reads into a budget of its own: still taken.
        ok = await http.post(telemetry_url(), json=reading, headers={"X-Provision-Token": token})
        assert ok.status_code == 201, ok.text
        # A wrong one is refused at once, its body unread, the connection closed.
        wrong = await http.post(
            telemetry_url(), json=reading, headers={"X-Provision-Token": "pdt_wrong"}
        )
        assert wrong.status_code == 401 and wrong.headers["connection"] == "close"
        # Routes that check a JWT before reading a body are not affected.
        bearer = {"Authorization": f"Bearer {make_token('t1')}"}
        assert (await http.get("/api/v1/customer/devices", headers=bearer)).status_code == 200

        # The holders leave: their bytes are given back, and readings are taken again.
        for writer in holders:
            writer.close()
        await until(http, lambda held: held == 0)
        response = await http.post(
            telemetry_url(), json=reading, headers={"X-Provision-Token": token}
        )
        assert response.status_code == 201, response.text
    assert await stored_rows(pool) == 2


async def test_a_body_under_the_limit_is_served_and_given_back(
    url: str, pool: asyncpg.Pool
) -> None:
    token = await provision_device(pool, "t1", "dev-1")
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        for _ in range(3):  # more than the buffer in all, one after the other
            body = b'{"metrics": {"v": 1}}' + b" " * (MIB - 30)
            response = await http.post(
                telemetry_url(), content=body, headers={"X-Provision-Token": token}
            )
            assert response.status_code == 201, response.text
        assert await buffered(http) == 0
    assert await stored_rows(pool) == 3


async def test_one_device_holds_at_most_its_share_of_the_second_budget(
    url: str, pool: asyncpg.Pool
) -> None:
    """From the abuse audit: under pressure a device that proved itself reads into a
    second budget, which had no share per device: a device token in the wrong hands
    filled it with unfinished bodies, and every other device was refused again. One
    device now holds at most an eighth of it (one largest body at least: 1 MiB here)."""
    token_a = await provision_device(pool, "t1", "dev-a")
    token_b = await provision_device(pool, "t1", "dev-b")
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        strangers = [await unfinished(url, BATCH), await unfinished(url, BATCH)]
        await until(http, lambda held: held == 2 * (MIB - 1))  # under pressure
        first = await unfinished(url, telemetry_url(device="dev-a"), token_a)
        deadline = time.monotonic() + 20
        while await buffered(http) < 3 * (MIB - 1):
            assert time.monotonic() < deadline, "dev-a's first body is not held"
            await asyncio.sleep(0.02)
        # Its second does not fit its share: refused at once, its body unread.
        second = await unfinished(url, telemetry_url(device="dev-a"), token_a)
        head = await asyncio.wait_for(second.reader.readuntil(b"\r\n\r\n"), 10)  # type: ignore[attr-defined]
        assert head.startswith(b"HTTP/1.1 503"), head
        second.close()
        # Another device of the tenant still gets in.
        ok = await http.post(
            telemetry_url(device="dev-b"),
            json={"metrics": {"v": 1}},
            headers={"X-Provision-Token": token_b},
        )
        assert ok.status_code == 201, ok.text
        for writer in [*strangers, first]:
            writer.close()
        deadline = time.monotonic() + 20
        while await buffered(http):  # both budgets given back
            assert time.monotonic() < deadline, "bytes still held"
            await asyncio.sleep(0.02)
    assert await stored_rows(pool) == 1
