"""The one error body: ``{"error": "<machine_code>", "detail": "<sentence>"}``."""

from __future__ import annotations

import logging

from quart import Quart, Response, jsonify
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from pulse.db.errors import DatabaseUnavailable

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    response = jsonify({"error": code, "detail": detail})
    response.status_code = status
    response.headers.update(headers or {})
    return response


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "rate_limited",
}


def register_error_handlers(app: Quart) -> None:
    @app.errorhandler(ApiError)
    async def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.errorhandler(RequestSchemaValidationError)
    async def _schema_error(exc: RequestSchemaValidationError) -> Response:
        return error_response(400, "invalid_payload", _validation_sentence(exc))

    @app.errorhandler(DatabaseUnavailable)
    async def _db_down(exc: DatabaseUnavailable) -> Response:
        log.warning("database unavailable: %s", exc)
        return error_response(
            503,
            "database_unavailable",
            "The database is unreachable; retry shortly.",
            {"Retry-After": "2"},
        )

    @app.errorhandler(HTTPException)
    async def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            return error_response(413, "payload_too_large", "The request body is over 1 MiB.")
        return error_response(status, _HTTP_CODES.get(status, "http_error"), exc.description or "")

    @app.errorhandler(Exception)
    async def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "An internal error occurred.")


def _validation_sentence(exc: RequestSchemaValidationError) -> str:
    inner = exc.validation_error
    errors = getattr(inner, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            return f"{where}: {first.get('msg', 'invalid value')}" if where else first["msg"]
        except (IndexError, KeyError, TypeError):
            pass
    return "The request body does not match the expected shape."
