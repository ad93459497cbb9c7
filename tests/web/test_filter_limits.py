"""PULSE_MAX_DEVICE_FILTERS on the URL (CONTRACT 5: at most that many device ids per
connection): one more is refused before the stream opens, WebSocket 4000 and SSE
400 invalid_parameter; exactly that many are served."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from pulse.config import Settings
from tests.streams.ws_support import WS_PATH, close_of, open_ws, recv
from tests.support import running_server

pytestmark = pytest.mark.timeout(60)

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"
LIMIT = 3


@pytest.fixture
async def url(settings: Settings) -> AsyncIterator[str]:
    async with running_server(dataclasses.replace(settings, max_device_filters=LIMIT)) as base:
        yield base


async def test_one_device_filter_too_many_is_refused(
    url: str, make_token: Callable[..., str]
) -> None:
    token = make_token("t1")
    allowed = ",".join(f"d{i}" for i in range(LIMIT))
    too_many = allowed + ",d9"
    async with open_ws(url, token=token, device_id=allowed) as ws:
        connected = await recv(ws)
        assert connected["filters"]["device_ids"] == sorted(allowed.split(","))
    assert await close_of(url, WS_PATH, token=token, device_id=too_many) == (
        4000,
        "invalid_parameter",
    )
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        headers = {"Authorization": f"Bearer {token}"}
        answer = await http.get(SSE_PATH, params={"device_id": too_many}, headers=headers)
        assert answer.status_code == 400
        assert answer.json()["error"] == "invalid_parameter"
        assert str(LIMIT) in answer.json()["detail"]
        async with http.stream(
            "GET", SSE_PATH, params={"device_id": allowed}, headers=headers
        ) as stream:
            assert stream.status_code == 200
