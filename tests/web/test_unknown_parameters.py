"""A query parameter an endpoint does not take is refused, naming it and the ones it
does take: a misspelt filter (`device_ids`, the Python client's argument name, for
`device_id`) used to be ignored, and the whole stream or range came back unfiltered."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.streams.ws_support import WS_PATH, close_of

pytestmark = pytest.mark.timeout(60)

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"
STREAM_TAKES = "device_id, metric, last_event_id, tenant_id, ticket and token"


@pytest.mark.parametrize(
    ("path", "params", "takes"),
    [
        (SSE_PATH, {"device_ids": "d1"}, STREAM_TAKES),
        (SSE_PATH, {"device_id": "d1", "metrics": "temp"}, STREAM_TAKES),
        (
            "/api/v1/customer/devices/d1/telemetry",
            {"start": "2026-12-01T00:00:00Z"},
            "from, to, bucket, agg, metrics, limit, cursor and tenant_id",
        ),
        (
            "/api/v1/customer/telemetry/history",
            {"metric": "temp", "limit": "5"},
            "metric, device_id, from, to, bucket, agg and tenant_id",
        ),
        ("/api/v1/customer/alerts", {"statuss": "active"}, "status, limit, cursor and tenant_id"),
        # Documented in fleet.md's table of the device API since a fleet audit.
        ("/api/v1/customer/devices/d1", {"fields": "status"}, "tenant_id"),
    ],
)
async def test_an_unknown_parameter_is_refused_by_name(
    http: httpx.AsyncClient,
    make_token: Callable[..., str],
    path: str,
    params: dict[str, str],
    takes: str,
) -> None:
    headers = {"Authorization": f"Bearer {make_token('t1')}"}
    answer = await http.get(path, params=params, headers=headers)
    assert answer.status_code == 400, answer.text
    (unknown,) = (name for name in params if name not in takes.replace(" and ", ", ").split(", "))
    assert answer.json() == {
        "error": "invalid_parameter",
        "detail": f"Unknown parameter {unknown!r}; this endpoint takes {takes}.",
    }


async def test_the_websocket_closes_4000_on_an_unknown_parameter(
    server: str, make_token: Callable[..., str]
) -> None:
    assert await close_of(server, WS_PATH, token=make_token("t1"), metrics="temp") == (
        4000,
        "invalid_parameter",
    )
