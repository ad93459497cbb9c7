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


@pytest.mark.parametrize(
    ("content", "content_type", "detail"),
    [
        # curl -d without -H 'Content-Type: application/json': a form, not JSON.
        (b'{"device_id": "dev-1"}', "application/x-www-form-urlencoded", None),
        (b'{"device_id": "dev-1"}', None, None),
        (b'["dev-1"]', "application/json", None),
        (b'{"device_id": "dev-1", "site": "s1"}', "application/json", "Unknown field 'site'."),
        (b'{"device_id": "has space"}', "application/json", "device_id: must be "),
        (b"{}", "application/json", "device_id: Field required"),
    ],
)
async def test_a_device_body_that_is_wrong_says_what_to_change(
    http: httpx.AsyncClient,
    make_token: Callable[..., str],
    content: bytes,
    content_type: str | None,
    detail: str | None,
) -> None:
    headers = {"Authorization": f"Bearer {make_token(roles=('tenant-admin',))}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = await http.post("/api/v1/customer/devices", content=content, headers=headers)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_payload"
    if detail is None:  # the body as a whole
        assert body["detail"] == (
            "The body must be a JSON object, sent with Content-Type: application/json."
        )
    else:
        assert body["detail"].startswith(detail), body["detail"]
