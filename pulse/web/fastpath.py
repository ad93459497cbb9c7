"""Ingest answered straight from ASGI, before Quart: a device's readings and heartbeats,
and batches.

One reading per request is what a fleet mostly sends, and for such a small
request Quart's machinery (two tasks and a wait per request, a request
context, werkzeug headers and response objects, signals) costs about a third
of the server's CPU; for a batch it is time spent on the request rather than
its readings. A POST to a device's telemetry or heartbeat URL, or to the batch
URL, that declares a Content-Length within the limit is answered here instead,
through the same intake, Ingest, metrics and replies as the Quart routes in
``pulse.web.ingest``. Every other request, including chunked or oversized
bodies and paths that need Quart's routing, goes on to Quart unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, cast

from quart import Quart
from werkzeug.exceptions import RequestTimeout

from pulse.ingest import intake
from pulse.ingest.model import Rejected
from pulse.ingest.service import Receipt
from pulse.web import runtime_of
from pulse.web.ingest import (
    BATCH_URL,
    DEVICE_PATH,
    TOKEN_HEADER,
    Reply,
    batch_reply,
    error_reply,
    reply,
)

Scope = dict[str, Any]
ASGIReceiveCallable = Callable[[], Awaitable[dict[str, Any]]]
ASGISendCallable = Callable[[dict[str, Any]], Awaitable[None]]

_TOKEN = TOKEN_HEADER.lower().encode()
_JSON = (b"content-type", b"application/json")


class DeviceFastPath:
    """ASGI middleware: serves the device URLs, hands everything else to ``inner``."""

    def __init__(self, app: Quart, inner: Any) -> None:
        self._app = app
        self._inner = inner
        self._max_body = int(app.config["MAX_CONTENT_LENGTH"])

    def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Coroutine[Any, Any, None]:
        # Not a coroutine itself: a connection handed on to Quart (a stream, for
        # as long as it is open) does not keep a frame of this call alive.
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path = scope["path"]
            if path == BATCH_URL:
                length, _ = _length_and_token(scope["headers"])
                if length is not None and length <= self._max_body:
                    return self._serve_batch(receive, send)
            elif match := DEVICE_PATH.fullmatch(path):
                length, token = _length_and_token(scope["headers"])
                if length is not None and length <= self._max_body:
                    tenant_id, device_id, kind = match.groups()
                    return self._serve(kind, tenant_id, device_id, token, receive, send)
        return cast(Coroutine[Any, Any, None], self._inner(scope, receive, send))

    async def _serve_batch(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        receipt = Receipt("batch")
        try:
            body = await _read_body(receive, self._app.config["BODY_TIMEOUT"])
            if body is None:  # the client went away
                return
            items = intake.batch(body, receipt.at)
            ingest = runtime_of(self._app).ingest
            if isinstance(items, Rejected):
                # The envelope itself is wrong: one error body, not per-message results.
                [outcome] = await ingest([items], receipt)
                answer = reply(outcome)
            else:
                answer = batch_reply(await ingest(items, receipt))
        except Exception as exc:
            answer = error_reply(exc)
        await _send(send, answer)

    async def _serve(
        self,
        kind: str,
        tenant_id: str,
        device_id: str,
        token: str | None,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        receipt = Receipt(kind)
        try:
            body = await _read_body(receive, self._app.config["BODY_TIMEOUT"])
            if body is None:  # the client went away
                return
            item = (
                intake.reading(tenant_id, device_id, token, body, receipt.at)
                if kind == "telemetry"
                else intake.heartbeat(tenant_id, device_id, token)
            )
            [outcome] = await runtime_of(self._app).ingest([item], receipt)
            answer = reply(outcome)
        except Exception as exc:
            answer = error_reply(exc)
        await _send(send, answer)


def _length_and_token(headers: Iterable[tuple[bytes, bytes]]) -> tuple[int | None, str | None]:
    """The declared Content-Length (None: chunked or not declared) and the device token."""
    length = token = None
    for name, value in headers:
        if name == b"content-length":
            length = int(value) if value.isdigit() else None
        elif name == _TOKEN and token is None:
            token = value.decode("latin1")
        elif name == b"transfer-encoding":
            return None, token
    return length, token


async def _read_body(receive: ASGIReceiveCallable, timeout: float | None) -> bytes | None:
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return None
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    return b"".join(chunks)
    except TimeoutError:
        raise RequestTimeout() from None


async def _send(send: ASGISendCallable, answer: Reply) -> None:
    headers = [(name.lower().encode(), value.encode()) for name, value in answer.headers.items()]
    body = answer.body or b""
    if answer.body is not None:
        headers += [_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
