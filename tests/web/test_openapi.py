"""/openapi.json: what it documents and how (its answers against the server's are in
test_openapi_answers.py)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from pulse.app import create_app
from pulse.config import Settings
from pulse.web.openapi import SECURITY_SCHEMES, TAGS
from tests.support import TEST_SECRET

CUSTOMER = "/api/v1/customer/"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    """The document as served (as JSON: status codes are strings)."""
    app = create_app(Settings(jwt_secret=TEST_SECRET))
    schema: dict[str, Any] = json.loads(
        app.json.dumps(app.extensions["QUART_SCHEMA"].openapi_provider.schema())
    )
    return schema


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    ]


def test_only_the_api_is_documented(spec: dict[str, Any]) -> None:
    paths = set(spec["paths"])
    # Pages and files are not API: the dashboard, this page, static files, the document.
    assert not {"/", "/docs", "/openapi.json"} & paths
    assert not [path for path in paths if "static" in path]
    assert all(
        path.startswith(("/api/", "/ingest/", "/healthz", "/readyz", "/metrics")) for path in paths
    )


def test_every_operation_has_a_known_tag_and_a_summary(spec: dict[str, Any]) -> None:
    names = [tag["name"] for tag in spec["tags"]]
    assert names == [tag["name"] for tag in TAGS]
    used = set()
    for method, path, operation in operations(spec):
        assert len(operation.get("tags", [])) == 1, (method, path)
        assert operation["tags"][0] in names, (method, path)
        assert operation.get("summary"), (method, path)
        used.add(operation["tags"][0])
    assert used == set(names)


def test_security_schemes(spec: dict[str, Any]) -> None:
    schemes = spec["components"]["securitySchemes"]
    assert schemes == SECURITY_SCHEMES
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert schemes["provisionToken"]["name"] == "X-Provision-Token"
    for method, path, operation in operations(spec):
        security = operation.get("security")
        if path.startswith(CUSTOMER) or path == "/api/v1/stream-ticket":
            assert {"bearer": []} in security, (method, path)
            assert {"session": []} in security, (method, path)
        elif "/device/{device_id}/" in path:
            assert security == [{"provisionToken": []}], (method, path)
        else:  # the batch carries its tokens in the body; operations need none
            assert security is None, (method, path)
    sse = spec["paths"][CUSTOMER + "telemetry/stream/sse"]["get"]
    assert {"ticket": []} in sse["security"] and {"token": []} in sse["security"]


def test_every_error_response_names_its_codes(spec: dict[str, Any]) -> None:
    for method, path, operation in operations(spec):
        for status, response in operation["responses"].items():
            if int(status) < 400 or (path, status) == ("/readyz", "503"):
                continue
            schema = response["content"]["application/json"]["schema"]
            schema = schema["oneOf"][-1] if "oneOf" in schema else schema
            codes = schema["properties"]["error"]["enum"]
            assert codes, (method, path, status)
            for code in codes:
                assert f"`{code}`" in response["description"], (method, path, status)


def test_bodiless_and_streaming_answers(spec: dict[str, Any]) -> None:
    paths = spec["paths"]
    for path, method in (
        (CUSTOMER + "devices/{device_id}", "delete"),
        (CUSTOMER + "alert-rules/{rule_id}", "delete"),
        ("/ingest/v1/tenant/{tenant_id}/device/{device_id}/heartbeat", "post"),
    ):
        assert "content" not in paths[path][method]["responses"]["204"], path
    sse = paths[CUSTOMER + "telemetry/stream/sse"]["get"]
    assert set(sse["responses"]["200"]["content"]) == {"text/event-stream"}
    parameters = {(p["in"], p["name"].lower()) for p in sse["parameters"]}
    assert {
        ("query", "device_id"),
        ("query", "metric"),
        ("query", "last_event_id"),
        ("query", "tenant_id"),
        ("header", "last-event-id"),
    } <= parameters
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_errors_with_a_header_document_it(spec: dict[str, Any]) -> None:
    telemetry = spec["paths"]["/ingest/v1/tenant/{tenant_id}/device/{device_id}/telemetry"]
    for status in ("429", "503"):
        assert "Retry-After" in telemetry["post"]["responses"][status]["headers"]
    devices = spec["paths"][CUSTOMER + "devices"]["get"]
    assert "WWW-Authenticate" in devices["responses"]["401"]["headers"]


async def test_served_as_json(http: httpx.AsyncClient, spec: dict[str, Any]) -> None:
    response = await http.get("/openapi.json")
    assert response.status_code == 200
    served = response.json()
    assert served["openapi"].startswith("3.1")
    assert set(served["paths"]) == set(spec["paths"])
