"""The fleet routes are served, documented, and started with the app."""

from __future__ import annotations

import httpx

FLEET_PATHS = {
    "/api/v1/customer/fleet/summary": {"get"},
    "/api/v1/customer/alerts": {"get"},
    "/api/v1/customer/alerts/{alert_id}/acknowledge": {"post"},
    "/api/v1/customer/alerts/{alert_id}/close": {"post"},
    "/api/v1/customer/alert-rules": {"get", "post"},
    "/api/v1/customer/alert-rules/{rule_id}": {"delete"},
}


async def test_routes_are_in_the_openapi_document(http: httpx.AsyncClient) -> None:
    paths = (await http.get("/openapi.json")).json()["paths"]
    for path, methods in FLEET_PATHS.items():
        assert set(paths[path]) == methods, path
