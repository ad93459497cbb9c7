"""What /openapi.json says: quart-schema's document, plus what it cannot say by itself.

Routes keep quart-schema's decorators for their bodies, parameters and success
shapes, and add two of their own: ``errors(...)`` names the catalogue entries
(``pulse.errors``) a route answers with, and ``answers(...)`` documents an
answer that is not a JSON model (an empty 204, an event stream, plain text).
``PulseOpenAPI`` turns both into response objects, one per status, each listing
its error codes, so the document says what the server does; a test calls every
route and compares (tests/web/test_openapi_answers.py).

The shapes further down are for the document only: the ingest routes check
their requests in pulse.ingest, not with these.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Literal, TypeVar

from quart import Quart
from quart_schema import Info, OpenAPIProvider, QuartSchema
from werkzeug.routing.rules import Rule

from pulse.errors import (
    CONNECTION_LIMIT,
    DATABASE_UNAVAILABLE,
    EXPORT_LIMIT,
    FORBIDDEN,
    HISTORY_LIMIT,
    INVALID_TENANT_ID,
    INVALID_TICKET,
    INVALID_TOKEN,
    KEYS_UNAVAILABLE,
    MISSING_TOKEN,
    ORIGIN_NOT_ALLOWED,
    RATE_LIMITED,
    TENANT_REQUIRED,
    TOKEN_EXPIRED,
    ErrorCode,
)

F = TypeVar("F", bound=Callable[..., Any])

_ERRORS = "_pulse_openapi_errors"
_ANSWERS = "_pulse_openapi_answers"

# -- who may call ------------------------------------------------------------------

SECURITY_SCHEMES: dict[str, dict[str, str]] = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A JWT: `Authorization: Bearer <jwt>` (docs/security.md).",
    },
    "session": {
        "type": "apiKey",
        "in": "cookie",
        "name": "pulse_session",
        "description": "The same JWT in the `pulse_session` cookie.",
    },
    "token": {
        "type": "apiKey",
        "in": "query",
        "name": "token",
        "description": "Streams only: the JWT as a query parameter, for clients that cannot "
        "set headers. URLs end up in logs: prefer a ticket.",
    },
    "ticket": {
        "type": "apiKey",
        "in": "query",
        "name": "ticket",
        "description": "Streams only: a one-time ticket from POST /api/v1/stream-ticket.",
    },
    "provisionToken": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Provision-Token",
        "description": "A device's provision token, shown when the device was created or "
        "its token rotated.",
    },
}
Security = list[dict[str, list[str]]]
# Alternatives: any one of them will do.
JWT: Security = [{"bearer": []}, {"session": []}]
STREAM_AUTH: Security = [*JWT, {"token": []}, {"ticket": []}]
DEVICE_TOKEN: Security = [{"provisionToken": []}]

# In the order the page shows them.
TAGS = [
    {"name": "devices", "description": "Provision devices, rotate their tokens (docs/fleet.md)."},
    {"name": "fleet", "description": "Devices by status (docs/fleet.md)."},
    {"name": "alerts", "description": "List, acknowledge and close alerts (docs/fleet.md)."},
    {"name": "alert-rules", "description": "Threshold rules that raise alerts (docs/fleet.md)."},
    {"name": "ingest", "description": "Devices and gateways send readings (docs/ingest.md)."},
    {
        "name": "history",
        "description": "Telemetry over time: buckets, readings, exports (docs/history.md).",
    },
    {
        "name": "streams",
        "description": "Live telemetry over SSE, and tickets to open streams "
        "(docs/protocol.md, which also describes the WebSocket streams: OpenAPI cannot).",
    },
    {"name": "operations", "description": "Health, readiness, stream status and metrics."},
]

# -- the errors that groups of routes share -------------------------------------------

# A JWT route: no token, a bad one, or a role or tenant that does not allow it.
AUTH = (MISSING_TOKEN, INVALID_TOKEN, TOKEN_EXPIRED, FORBIDDEN, KEYS_UNAVAILABLE)
# A route that acts on one tenant (operators must name it) and reads the database.
TENANT_READ = (*AUTH, TENANT_REQUIRED, INVALID_TENANT_ID, DATABASE_UNAVAILABLE)
# A change: also refused when made with the session cookie from a foreign page (CSRF).
TENANT_WRITE = (*TENANT_READ, ORIGIN_NOT_ALLOWED)
# A read that operators may make across every tenant (no tenant_id needed).
CROSS_TENANT_READ = (*AUTH, INVALID_TENANT_ID, DATABASE_UNAVAILABLE)
STREAM = (*TENANT_READ, INVALID_TICKET)

# Errors that come with a header a client should read.
_ERROR_HEADERS: dict[ErrorCode, dict[str, Any]] = {
    code: {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
    for code in (
        RATE_LIMITED,
        CONNECTION_LIMIT,
        EXPORT_LIMIT,
        HISTORY_LIMIT,
        DATABASE_UNAVAILABLE,
        KEYS_UNAVAILABLE,
    )
}
for _code in (MISSING_TOKEN, INVALID_TOKEN, TOKEN_EXPIRED, INVALID_TICKET):
    _ERROR_HEADERS[_code] = {
        "WWW-Authenticate": {"description": 'Bearer realm="pulse"', "schema": {"type": "string"}}
    }


def errors(*codes: ErrorCode) -> Callable[[F], F]:
    """Document the errors a route answers with, by their catalogue entries."""

    def decorator(func: F) -> F:
        setattr(func, _ERRORS, (*getattr(func, _ERRORS, ()), *codes))
        return func

    return decorator


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    description: str
    media_type: str | None
    example: str | None


def answers(
    status: int, description: str, media_type: str | None = None, example: str | None = None
) -> Callable[[F], F]:
    """Document an answer that is no JSON model: ``media_type`` None means no body."""

    def decorator(func: F) -> F:
        answer = Answer(status, description, media_type, example)
        setattr(func, _ANSWERS, (*getattr(func, _ANSWERS, ()), answer))
        return func

    return decorator


def document_api(app: Quart) -> None:
    """/openapi.json for ``app``. The page that shows it is ``pulse.apidocs``."""
    QuartSchema(
        app,
        info=Info(
            title="Pulse",
            version="1",
            description="Real-time telemetry for fleets of devices. Guides: docs/ingest.md, "
            "docs/fleet.md, docs/protocol.md. Every error is "
            '`{"error": "<code>", "detail": "<sentence>"}`.',
        ),
        openapi_path="/openapi.json",
        swagger_ui_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        openapi_provider_class=PulseOpenAPI,
    )


class PulseOpenAPI(OpenAPIProvider):
    """quart-schema's provider, through the methods it offers for overriding."""

    def __init__(self, app: Quart, extension: QuartSchema) -> None:
        super().__init__(app, extension)
        self._views = app.view_functions  # filled in as blueprints register

    def schema(self) -> dict[str, Any]:
        # Given here as plain JSON: quart-schema's classes for them drop descriptions.
        schema = super().schema()
        schema["components"]["securitySchemes"] = SECURITY_SCHEMES
        schema["tags"] = TAGS
        return schema

    def generate_rules(self) -> Iterable[Rule]:
        # Static files are files, not API: the app's and every blueprint's.
        for rule in super().generate_rules():
            if rule.endpoint != "static" and not rule.endpoint.endswith(".static"):
                yield rule

    def build_querystring_parameters(
        self, model: type[Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        parameters, definitions = super().build_querystring_parameters(model)
        return [_absent_not_null(p) for p in parameters], definitions

    def build_headers_parameters(
        self, model: type[Any]
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        parameters, definitions = super().build_headers_parameters(model)
        return [_absent_not_null(p) for p in parameters], definitions

    def build_paths(self, rule: Rule) -> tuple[dict[str, Any], dict[str, Any]]:
        paths, components = super().build_paths(rule)
        func = self._views[rule.endpoint]
        for operations in paths.values():
            for operation in operations.values():
                operation["responses"] = self._responses(operation["responses"], func)
        return paths, components

    def _responses(self, documented: dict[int, Any], func: Callable[..., Any]) -> dict[int, Any]:
        responses = {status: _headers_in_place(dict(r)) for status, r in documented.items()}
        for answer in getattr(func, _ANSWERS, ()):
            response: dict[str, Any] = {"description": answer.description}
            if answer.media_type is not None:
                media: dict[str, Any] = {"schema": {"type": "string"}}
                if answer.example is not None:
                    media["example"] = answer.example
                response["content"] = {answer.media_type: media}
                # Another media type of a status documented already (a JSON model
                # that can also come as CSV): one response, several contents.
                if answer.status in responses:
                    known = responses[answer.status]
                    known["content"] = {**known.get("content", {}), **response["content"]}
                    known["description"] += f" {answer.description}"
                    continue
            responses[answer.status] = response
        by_status: dict[int, list[ErrorCode]] = {}
        for code in dict.fromkeys(getattr(func, _ERRORS, ())):
            assert code.status is not None, f"{code} is never an HTTP answer"
            by_status.setdefault(code.status, []).append(code)
        for status, codes in sorted(by_status.items()):
            responses[status] = _merged(responses.get(status), _error_response(codes))
        return dict(sorted(responses.items()))


def _absent_not_null(parameter: dict[str, Any]) -> dict[str, Any]:
    # An optional parameter (``str | None = None`` in its model) is left out, never
    # sent as null: document its one real type.
    schema = parameter["schema"]
    kinds = schema.get("anyOf", [])
    real = [kind for kind in kinds if kind != {"type": "null"}]
    if len(kinds) != 2 or len(real) != 1:
        return parameter
    rest = {k: v for k, v in schema.items() if k != "anyOf" and (k, v) != ("default", None)}
    return {**parameter, "schema": {**real[0], **rest}}


def _error_response(codes: list[ErrorCode]) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    for code in codes:
        headers.update(_ERROR_HEADERS.get(code, {}))
    response: dict[str, Any] = {
        "description": "\n".join(f"- `{code}`: {code.meaning}" for code in codes),
        "content": {"application/json": {"schema": _error_schema(codes)}},
    }
    if headers:
        response["headers"] = headers
    return response


def _error_schema(codes: list[ErrorCode]) -> dict[str, Any]:
    return {
        "title": "Error",
        "type": "object",
        "properties": {
            "error": {"type": "string", "enum": [code.code for code in codes]},
            "detail": {"type": "string", "description": "A sentence for people."},
        },
        "required": ["error", "detail"],
        "additionalProperties": False,
    }


def _merged(response: dict[str, Any] | None, errors: dict[str, Any]) -> dict[str, Any]:
    """One status, two shapes (the batch's 400): either body may come."""
    if response is None:
        return errors
    ours = response["content"]["application/json"]["schema"]
    theirs = errors["content"]["application/json"]["schema"]
    return {
        **response,
        **errors,
        "description": f"{response['description']}\n\nOr an error:\n{errors['description']}",
        "content": {"application/json": {"schema": {"oneOf": [ours, theirs]}}},
    }


def _headers_in_place(response: dict[str, Any]) -> dict[str, Any]:
    # quart-schema puts a response's headers among its media types; OpenAPI wants
    # them beside the content.
    content = response.get("content")
    if isinstance(content, dict) and "headers" in content:
        content = dict(content)
        headers = content.pop("headers")
        response = {**response, "content": content, "headers": headers}
    return response


# -- shapes of the ingest routes -------------------------------------------------------


@dataclasses.dataclass
class ReadingBody:
    """One reading. ts defaults to the server's receive time; at most 200 metrics."""

    metrics: dict[str, float | bool]
    ts: datetime | None = None
    seq: int | None = None


@dataclasses.dataclass
class BatchMessage:
    tenant_id: str
    device_id: str
    provision_token: str
    metrics: dict[str, float | bool]
    ts: datetime | None = None
    seq: int | None = None


@dataclasses.dataclass
class BatchBody:
    """1 to 1000 messages, each judged on its own."""

    messages: list[BatchMessage]


@dataclasses.dataclass
class EventId:
    """Stored and committed."""

    id: int


@dataclasses.dataclass
class BatchResult:
    index: int
    status: Literal["accepted", "rejected"]
    id: int | None = None
    reason: str | None = None


@dataclasses.dataclass
class BatchResponse:
    """One result per message, in order (200: some were accepted; 400: none was)."""

    accepted: int
    rejected: int
    results: list[BatchResult]
