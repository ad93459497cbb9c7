"""Errors as the web layer answers them: never a 500 for what a client sent."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest


@pytest.mark.parametrize("path", ["/api/v1/customer/devices", "/api/v1/customer/alert-rules"])
async def test_a_body_that_is_not_utf8_is_an_invalid_payload(
    http: httpx.AsyncClient, make_token: Callable[..., str], path: str
) -> None:
    # Found by the fuzz test: Quart decodes a JSON body as UTF-8 before parsing it.
    response = await http.post(
        path,
        content=b"\r\xa1(\xb0\x1c\xda\xa2",
        headers={
            "Authorization": f"Bearer {make_token(roles=('tenant-admin',))}",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_payload", "detail": "The body is not UTF-8 text."}


@pytest.mark.parametrize("path", ["/api/v1/customer/devices", "/api/v1/customer/alert-rules"])
async def test_a_body_that_is_not_json_is_an_invalid_payload(
    http: httpx.AsyncClient, make_token: Callable[..., str], path: str
) -> None:
    # As for readings: not bad_request with a sentence about browsers and proxies.
    response = await http.post(
        path,
        content=b'{"device_id": ',
        headers={
            "Authorization": f"Bearer {make_token(roles=('tenant-admin',))}",
            "Content-Type": "application/json",
        },
    )
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_payload"
    assert body["detail"].startswith("The body is not JSON: ")
