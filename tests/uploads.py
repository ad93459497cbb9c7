"""An ingest request whose body is still arriving: held open across a shutdown."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx

BODY = json.dumps({"metrics": {"temp": 21.0}}).encode()


class SlowUpload:
    """A POST of one reading of which all but the last byte of the body has been sent."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def finish(self) -> tuple[int, bytes]:
        """Send the last byte; the answer's status and body."""
        self.writer.write(BODY[-1:])
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await self.reader.readexactly(length)
        self.close()
        return status, body

    async def cut(self) -> bytes:
        """Wait until the server ends the connection; what it sent before it did."""
        try:
            return await self.reader.read()
        except ConnectionError:
            return b""
        finally:
            self.close()

    def close(self) -> None:
        self.writer.close()


async def slow_upload(url: str, tenant: str, device: str, token: str) -> SlowUpload:
    """Start the upload on a new connection to the server at ``url``; once it returns,
    the server holds the body sent so far (``pulse_ingest_buffered_bytes``, summed over
    the workers) and waits for the rest."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /ingest/v1/tenant/{tenant}/device/{device}/telemetry HTTP/1.1\r\n"
        f"Host: pulse\r\nX-Provision-Token: {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n".encode()
        + BODY[:-1]
    )
    await writer.drain()
    deadline = time.monotonic() + 20  # another worker's gauge is refreshed every 2 s
    while await buffered(url) < len(BODY) - 1:
        assert time.monotonic() < deadline, "the server never took the upload"
        await asyncio.sleep(0.05)
    return SlowUpload(reader, writer)


async def buffered(url: str) -> int:
    """The instance's ``pulse_ingest_buffered_bytes``, on a new connection."""
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=fresh, timeout=10) as http:
        text = (await http.get("/metrics")).text
    match = re.search(r"^pulse_ingest_buffered_bytes (\S+)$", text, re.MULTILINE)
    assert match, "the gauge is exported"
    return int(float(match[1]))
