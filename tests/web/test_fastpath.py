"""The device fast path (pulse.ingest.fastpath) against Quart's routes, over a real socket.

A device URL with a Content-Length is served before Quart; the same request sent
chunked goes through Quart. Both doors must answer alike and store alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import orjson
import pytest
from quart import Quart

from pulse.config import Settings
from tests.ingest.conftest import stored_rows
from tests.support import running_server
from tests.web.test_ingest import heartbeat_url, telemetry_url


async def _chunked(content: bytes) -> AsyncIterator[bytes]:
    yield content


async def test_device_requests_with_a_length_skip_quart(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str, quart_requests: list[str]
) -> None:
    headers = {"X-Provision-Token": token}
    fast = await http.post(telemetry_url(), json={"metrics": {"v": 1}}, headers=headers)
    beat = await http.post(heartbeat_url(), headers=headers)
    assert (fast.status_code, beat.status_code) == (201, 204), (fast.text, beat.text)
    assert quart_requests == []

    chunked = await http.post(
        telemetry_url(), content=_chunked(b'{"metrics": {"v": 2}}'), headers=headers
    )
    assert chunked.status_code == 201, chunked.text
    assert quart_requests == [telemetry_url()]
    assert chunked.json()["id"] == fast.json()["id"] + 1
    assert await stored_rows(pool) == 2


CASES = [
    ("reading", telemetry_url(), b'{"metrics": {"v": 1}}', "token"),
    ("heartbeat", heartbeat_url(), b"", "token"),
    ("bad json", telemetry_url(), b'{"metrics": ', "token"),
    ("bad value", telemetry_url(), b'{"metrics": {"v": "x"}}', "token"),
    ("no token", telemetry_url(), b'{"metrics": {"v": 1}}', None),
    ("wrong token", telemetry_url(), b'{"metrics": {"v": 1}}', "pdt_wrong"),
    ("unknown device", telemetry_url(device="ghost"), b'{"metrics": {"v": 1}}', "token"),
    ("bad name", telemetry_url(tenant="t%C3%A9"), b'{"metrics": {"v": 1}}', "token"),
    ("heartbeat, bad token", heartbeat_url(), b"", "pdt_wrong"),
]


@pytest.mark.parametrize(
    ("url", "content", "credential"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_both_doors_answer_alike(
    http: httpx.AsyncClient,
    pool: asyncpg.Pool,
    token: str,
    quart_requests: list[str],
    url: str,
    content: bytes,
    credential: str | None,
) -> None:
    headers = (
        {}
        if credential is None
        else {"X-Provision-Token": token if credential == "token" else credential}
    )
    fast = await http.post(url, content=content, headers=headers)
    assert quart_requests == []
    slow = await http.post(url, content=_chunked(content), headers=headers)
    assert len(quart_requests) == 1
    assert fast.status_code == slow.status_code
    assert fast.headers.get("content-type") == slow.headers.get("content-type")
    if fast.status_code == 201:
        assert slow.json()["id"] == fast.json()["id"] + 1
        assert await stored_rows(pool) == 2
    else:
        assert fast.content == slow.content
        assert await stored_rows(pool) == 0


def _batch(token: str, *metrics: object) -> bytes:
    return orjson.dumps(
        {
            "messages": [
                {"tenant_id": "t1", "device_id": "dev-1", "provision_token": token, "metrics": m}
                for m in metrics
            ]
        }
    )


async def test_batches_skip_quart_and_both_doors_answer_alike(
    http: httpx.AsyncClient, pool: asyncpg.Pool, token: str, quart_requests: list[str]
) -> None:
    cases = [
        _batch(token, {"v": 1}, {"v": 2}),
        _batch(token, {"v": 1}, {"v": "x"}, {"bad name": 1}),  # rejected ones named
        _batch("pdt_wrong", {"v": 1}),  # none accepted: 400
        b'{"messages": []}',  # the envelope: one error body
        b'{"messages": ',
    ]
    for content in cases:
        fast = await http.post("/ingest/v1/batch", content=content)
        assert quart_requests == []
        slow = await http.post("/ingest/v1/batch", content=_chunked(content))
        assert quart_requests == ["/ingest/v1/batch"]
        quart_requests.clear()
        assert (fast.status_code, fast.headers["content-type"]) == (
            slow.status_code,
            slow.headers["content-type"],
        )
        fast_body, slow_body = fast.json(), slow.json()
        if "results" in fast_body:  # the slow door's ids come after the fast door's
            accepted = fast_body["accepted"]
            for result in slow_body["results"]:
                if result["status"] == "accepted":
                    result["id"] -= accepted
        assert fast_body == slow_body, content
    assert await stored_rows(pool) == 2 * 3


async def _raw(server: str, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = server.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    return reader, writer


def _head(url: str, token: str, length: int) -> bytes:
    return (
        f"POST {url} HTTP/1.1\r\nHost: pulse\r\nX-Provision-Token: {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def test_a_body_that_stops_coming_is_answered_408(
    settings: Settings, pool: asyncpg.Pool, token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Quart, "default_config", {**Quart.default_config, "BODY_TIMEOUT": 0.5})
    body = b'{"metrics": {"v": 1}}'
    async with running_server(settings) as server:
        reader, writer = await _raw(server, _head(telemetry_url(), token, len(body)) + body[:5])
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 408"), head
        finally:
            writer.close()
    assert await stored_rows(pool) == 0


async def test_clients_gone_mid_body_or_before_the_answer_harm_nothing(
    http: httpx.AsyncClient, server: str, pool: asyncpg.Pool, token: str
) -> None:
    body = b'{"metrics": {"v": 1}}'
    for cut in (5, len(body)):  # mid-body: nothing stored; whole body: stored, answer unread
        for _ in range(20):
            _, writer = await _raw(server, _head(telemetry_url(), token, len(body)) + body[:cut])
            writer.close()
            await writer.wait_closed()
    response = await http.post(
        telemetry_url(), json={"metrics": {"v": 1}}, headers={"X-Provision-Token": token}
    )
    assert response.status_code == 201, response.text
    for _ in range(100):
        if await stored_rows(pool) == 21:
            break
        await asyncio.sleep(0.05)
    assert await stored_rows(pool) == 21
    assert 1 <= orjson.loads(response.content)["id"] <= 21
