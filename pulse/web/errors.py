"""The one place errors become HTTP answers: every exception maps to a catalogue entry.

Quart's error handlers and the device fast path both answer through
``error_for``, so an error looks the same whichever door it came in by, and
never carries a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NoReturn

from quart import Quart, Request, Response, request
from quart_schema import RequestSchemaValidationError
from werkzeug.exceptions import HTTPException

from pulse.db.errors import DatabaseTimeout, DatabaseUnavailable
from pulse.errors import (
    BAD_REQUEST,
    DATABASE_UNAVAILABLE,
    FORBIDDEN,
    HTTP_ERROR,
    INTERNAL_ERROR,
    INVALID_PARAMETER,
    INVALID_PAYLOAD,
    METHOD_NOT_ALLOWED,
    NOT_FOUND,
    PAYLOAD_TOO_LARGE,
    RATE_LIMITED,
    REQUEST_TIMEOUT,
    UNAUTHORIZED,
    ApiError,
    ErrorCode,
    error_body,
)
from pulse.logs import Throttled
from pulse.names import unknown_parameter

log = logging.getLogger(__name__)
# One line per ten seconds of an outage, not one per request refused.
_UNAVAILABLE = Throttled(log)
_TIMED_OUT = Throttled(log)
_NO_ANSWER = Throttled(log)
_UNHANDLED = Throttled(log)

# What an error raised by the HTTP layer itself (werkzeug) is called, by status.
_HTTP_CODES: dict[int, ErrorCode] = {
    400: BAD_REQUEST,
    401: UNAUTHORIZED,
    403: FORBIDDEN,
    404: NOT_FOUND,
    405: METHOD_NOT_ALLOWED,
    408: REQUEST_TIMEOUT,
    413: PAYLOAD_TOO_LARGE,
    429: RATE_LIMITED,
}


def error_for(exc: Exception) -> ApiError:
    """The error an exception is answered with; never a traceback."""
    match exc:
        case ApiError():
            return exc
        case RequestSchemaValidationError():
            return ApiError(INVALID_PAYLOAD, _validation_sentence(exc))
        case UnicodeDecodeError():
            # Quart decodes a JSON body before parsing it, and lets this escape.
            return ApiError(INVALID_PAYLOAD, "The body is not UTF-8 text.")
        case DatabaseTimeout(database_up=True):
            # The same code and status as an outage (the catalogue's; a client retries
            # both alike), but said as what it is: the server cancelled this request's
            # statement for its statement_timeout, so it is up and answering.
            _TIMED_OUT.warning(
                "database statement timed out (the database is up but did not finish "
                "it in time): %s; answering 503",
                exc,
            )
            return ApiError(
                DATABASE_UNAVAILABLE,
                "The database took too long to answer: a statement of this request ran "
                "past its timeout (the database is up). Retry shortly; a large batch may "
                "go through in smaller ones.",
                {"Retry-After": "2"},
            )
        case DatabaseTimeout():
            # asyncpg's own timeout: it fires alike for a slow statement and a server
            # that stopped answering (frozen, its machine gone), so neither is claimed.
            _NO_ANSWER.warning(
                "database did not answer within the statement's timeout (slow, or not "
                "answering): %s; answering 503",
                exc,
            )
            return ApiError(
                DATABASE_UNAVAILABLE,
                "The database did not answer in time (slow, or not answering). Retry "
                "shortly; a large batch may go through in smaller ones.",
                {"Retry-After": "2"},
            )
        case DatabaseUnavailable():
            _UNAVAILABLE.warning("database unavailable: %s; answering 503", exc)
            return ApiError(
                DATABASE_UNAVAILABLE,
                "The database is unreachable; retry shortly.",
                {"Retry-After": "2"},
            )
        case HTTPException(code=413):
            return ApiError(PAYLOAD_TOO_LARGE)
        case HTTPException():
            status = exc.code or 500
            error = _HTTP_CODES.get(status, HTTP_ERROR)
            return ApiError(error, exc.description or error.meaning, status=status)
        case _:
            # Its traceback once for each different error, then a line per 10 s: a
            # lasting one (INSERT revoked on telemetry) wrote ~38 lines per request.
            _UNHANDLED.error("unhandled error; answering 500 internal_error", exc=exc)
            return ApiError(INTERNAL_ERROR, "An internal error occurred.")


def error_response(error: ApiError) -> Response:
    return Response(
        error_body(error.error, error.detail),
        error.status,
        error.headers,
        content_type="application/json",
    )


class JsonRequest(Request):
    """Quart's request, with a body that is not JSON answered as any other invalid body
    (Quart's own answer is a bare 400 bad_request that says nothing)."""

    def on_json_loading_failed(self, error: Exception) -> NoReturn:
        raise ApiError(INVALID_PAYLOAD, f"The body is not JSON: {error}")


def register_error_handlers(app: Quart) -> None:
    app.request_class = JsonRequest

    async def answer(exc: Exception) -> Response:
        return error_response(error_for(exc))

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
    """pydantic's first complaint, in the words of the API: the field it is about, and
    what is wrong with it."""
    inner = exc.validation_error
    errors = getattr(inner, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()))
            kind = first.get("type")
        except (IndexError, KeyError, TypeError):
            pass
        else:
            if not where:  # the body as a whole: not an object, or not sent as JSON
                return "The body must be a JSON object, sent with Content-Type: application/json."
            if kind == "extra_forbidden":
                return f"Unknown field '{where}'."
            message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            return f"{where}: {message}"
    return "The request body does not match the expected shape."


def refuse_unknown_parameters(known: Sequence[str] = ("tenant_id",)) -> None:
    """A query parameter the route does not take is a 400, as everywhere in the API: a
    misspelt filter is refused rather than ignored."""
    unknown = unknown_parameter(request.args, known)
    if unknown is not None:
        raise ApiError(INVALID_PARAMETER, unknown)
