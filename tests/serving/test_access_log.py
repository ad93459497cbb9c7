"""The access log writes the path as it was sent: no forged lines, no terminal escapes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pulse.serving import log_safe
from tests.support import pulse_serve

pytestmark = pytest.mark.timeout(90)

FORGED = '127.0.0.1:1 "GET /admin 1.1" 200 2 0.1s'
# %0a would end the line and start a forged one; %1b[ is a terminal escape.
PATHS = [
    "/nowhere/a%0a" + FORGED.replace(" ", "%20").replace('"', "%22"),
    "/nowhere/b%1b[2J%1b[31mred%0d",
    '/nowhere/c"quote\\backslash',
]


async def request(url: str, target: str) -> bytes:
    address = urlsplit(url)
    reader, writer = await asyncio.open_connection(address.hostname, address.port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    answer = await reader.read()
    writer.close()
    return answer


async def test_paths_are_logged_raw_and_escaped(database_url: str, tmp_path: Path) -> None:
    async with pulse_serve(
        data_dir=tmp_path, database_url=database_url, env={"PULSE_ACCESS_LOG": "1"}, stdout=-1
    ) as server:
        for path in PATHS:
            assert (await request(server.url, path)).startswith(b"HTTP/1.1 404")
    logs = server.stdout + server.stderr
    assert b"\x1b" not in logs and b"\r" not in logs
    lines = [line for line in logs.decode().splitlines() if "/nowhere/" in line]
    assert len(lines) == len(PATHS), lines
    for line, path in zip(lines, PATHS, strict=True):
        assert f'"GET {log_safe(path)} 1.1" 404 ' in line, line
    assert "/nowhere/a%0a127.0.0.1:1%20%22GET%20/admin" in lines[0]
    assert not any(line.startswith(FORGED) for line in logs.decode().splitlines())
    assert "/nowhere/c\\x22quote\\x5cbackslash" in lines[2]


def test_log_safe() -> None:
    assert log_safe("/api/v1/devices/dev-1") == "/api/v1/devices/dev-1"
    assert log_safe('/a\nb\x1b[c d"e\\f\x7f\xe9\u2028') == (
        "/a\\x0ab\\x1b[c\\x20d\\x22e\\x5cf\\x7f\\xe9\\u2028"
    )
