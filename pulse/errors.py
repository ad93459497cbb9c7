"""The one error body: ``{"error": "<machine_code>", "detail": "<sentence>"}``."""

from __future__ import annotations

import logging

import orjson
from quart import Quart, Response
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


def error_body(code: str, detail: str) -> bytes:
    return orjson.dumps({"error": code, "detail": detail})


def error_response(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    return Response(error_body(code, detail), status, headers, content_type="application/json")


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    429: "rate_limited",
}


def error_for(exc: Exception) -> ApiError:
    """The error body and status an exception is answered with; never a traceback."""
    match exc:
        case ApiError():
            return exc
        case RequestSchemaValidationError():
            return ApiError(400, "invalid_payload", _validation_sentence(exc))
        case DatabaseUnavailable():
            log.warning("database unavailable: %s", exc)
            return ApiError(
                503,
                "database_unavailable",
                "The database is unreachable; retry shortly.",
                {"Retry-After": "2"},
            )
        case HTTPException(code=413):
            return ApiError(413, "payload_too_large", "The request body is over 1 MiB.")
        case HTTPException():
            status = exc.code or 500
            return ApiError(status, _HTTP_CODES.get(status, "http_error"), exc.description or "")
        case _:
            log.error("unhandled error", exc_info=exc)
            return ApiError(500, "internal_error", "An internal error occurred.")


def register_error_handlers(app: Quart) -> None:
    async def answer(exc: Exception) -> Response:
        error = error_for(exc)
        return error_response(error.status, error.code, error.detail, error.headers)

    # One handler per class: Quart picks by the exception's class, and treats
    # HTTPException apart from other exceptions.
    for kind in (
        ApiError,
        RequestSchemaValidationError,
        DatabaseUnavailable,
        HTTPException,
        Exception,
    ):
        app.register_error_handler(kind, answer)


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
