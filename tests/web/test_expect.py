"""``Expect: 100-continue``: a request refused whatever its body is answered without
``100 Continue``, so that its client never sends the body (RFC 9110, section 10.1.1);
one that is taken gets its 100 and then its answer. Raw HTTP/1.1 over loopback."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import asyncpg
import httpx
import orjson
import pytest

from tests.ingest.conftest import stored_rows
from tests.support import provision_device

pytestmark = pytest.mark.timeout(30)

READING = b"/ingest/v1/tenant/t1/device/dev-1/telemetry"
DEVICES = b"/api/v1/customer/devices"
EXPORT = "/api/v1/customer/devices/d1/telemetry"
BODY = b'{"metrics": {"temp": 21.5}}'


async def send_head(
    server: str, path: bytes, headers: dict[str, str], length: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A POST's head with ``Expect: 100-continue``, its body not sent."""
    host, port = server.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [b"POST " + path + b" HTTP/1.1", b"Host: pulse", b"Content-Type: application/json"]
    lines += [f"{name}: {value}".encode() for name, value in headers.items()]
    lines += [b"Content-Length: %d" % length, b"Expect: 100-continue"]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
    await writer.drain()
    return reader, writer


async def next_head(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip().lower()
    return None


@pytest.mark.parametrize(
    ("case", "path", "length", "status", "error"),
    [
        ("ingest, over 1 MiB", READING, 5_000_000, 413, "payload_too_large"),
        ("ingest, no token", READING, len(BODY), 401, "invalid_device_token"),
        ("devices, over 64 KiB", DEVICES, 5_000_000, 413, "payload_too_large"),
        ("devices, no credential", DEVICES, 50, 401, "missing_token"),
    ],
)
async def test_a_refusal_that_needs_no_body_comes_without_100_continue(
    server: str,
    token: str,
    make_token: Callable[..., str],
    case: str,
    path: bytes,
    length: int,
    status: int,
    error: str,
) -> None:
    headers = {}
    if "no token" not in case and "no credential" not in case:
        headers = (
            {"X-Provision-Token": token}
            if path == READING
            else {"Authorization": f"Bearer {make_token('t1', roles=('tenant-admin',))}"}
        )
    reader, writer = await send_head(server, path, headers, length)
    try:
        head = await next_head(reader)
        assert head.startswith(b"HTTP/1.1 %d " % status), head  # not 100 Continue
        assert header(head, b"connection") == b"close", head
        size = int(header(head, b"content-length") or 0)
        body = await asyncio.wait_for(reader.readexactly(size), 10)
        assert orjson.loads(body)["error"] == error
        # The body is never read: the server closes the connection.
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


async def sent_after_100(server: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    """The final answer's head to a request that sends ``body`` once told 100 Continue
    (which it must be)."""
    reader, writer = await send_head(server, path, headers, len(body))
    try:
        assert (await next_head(reader)).startswith(b"HTTP/1.1 100 ")
        writer.write(body)
        return await next_head(reader)
    finally:
        writer.close()


async def test_a_reading_within_limits_gets_100_continue_and_is_stored(
    server: str, token: str, pool: asyncpg.Pool
) -> None:
    head = await sent_after_100(server, READING, {"X-Provision-Token": token}, BODY)
    assert head.startswith(b"HTTP/1.1 201 "), head
    assert await stored_rows(pool) == 1


async def test_a_device_within_limits_gets_100_continue_and_is_created(
    server: str, make_token: Callable[..., str]
) -> None:
    admin = {"Authorization": f"Bearer {make_token('t1', roles=('tenant-admin',))}"}
    body = b'{"device_id": "expecting"}'
    head = await sent_after_100(server, DEVICES, admin, body)
    assert head.startswith(b"HTTP/1.1 201 "), head


async def test_an_export_sent_with_expect_and_no_body_ends_when_its_client_leaves(
    server: str, make_token: Callable[..., str], pool: asyncpg.Pool
) -> None:
    # A GET has no body to wait for: nothing holds Quart's receiver, which hears the
    # client leave (http.disconnect) and cancels the export. Held until a body is read
    # (which never comes), the export went on, waiting here on a lock, with its slot.
    await provision_device(pool, "t1", "d1")
    host, port = server.removeprefix("http://").split(":")
    async with httpx.AsyncClient(base_url=server, timeout=10) as http, pool.acquire() as conn:

        async def exports() -> float:
            found = re.search(
                r"^pulse_history_exports (\S+)$", (await http.get("/metrics")).text, re.M
            )
            return float(found.group(1)) if found else 0.0

        async with conn.transaction():
            await conn.execute("LOCK TABLE telemetry IN ACCESS EXCLUSIVE MODE")
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"GET {EXPORT}?from=2026-12-01T00:00:00Z&to=2026-12-02T00:00:00Z HTTP/1.1\r\n"
                f"Host: pulse\r\nAccept: text/csv\r\nExpect: 100-continue\r\n"
                f"Authorization: Bearer {make_token('t1')}\r\n\r\n".encode()
            )
            async with asyncio.timeout(10):
                while not await exports():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            writer.close()  # the client leaves, the export still waiting on the lock
            async with asyncio.timeout(3):
                while await exports():  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
