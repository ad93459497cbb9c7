"""Ingest answered straight from ASGI, before Quart: a device's readings and heartbeats,
and batches.

One reading per request is what a fleet mostly sends, and for such a small
request Quart's machinery (two tasks and a wait per request, a request
context, werkzeug headers and response objects, signals) costs about a third
of the server's CPU; for a batch it is time spent on the request rather than
its readings. A POST to a device's telemetry or heartbeat URL, or to the batch
URL, that declares a Content-Length within the limit is answered here instead,
through the same intake, Ingest, metrics and replies as the Quart routes in
``pulse.web.ingest``.

Every other ingest request (chunked bodies, paths that need Quart's routing)
has its body read here too, within the process's ingest
buffer (``pulse.web.bodies``), and then goes on to Quart, which reads it
again from memory. Bodies declared over the limit go on unread (Quart answers
413 at once), and so does every request that is not ingest. A device's request
without a token whose client waits for ``100 Continue`` is refused before its
body is asked for (``pulse.web.expect``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, cast

from quart import Quart

from pulse.errors import SERVER_BUSY, ApiError, error_body
from pulse.ingest import intake
from pulse.ingest.buffer import Device
from pulse.ingest.model import Rejected
from pulse.ingest.service import Ingest, Receipt
from pulse.ops.metrics import Metrics
from pulse.web import API_HEADERS, runtime_of
from pulse.web.asgi import ASGIReceiveCallable, ASGISendCallable, Scope
from pulse.web.bodies import read_body, replay
from pulse.web.errors import error_for
from pulse.web.expect import expects_continue
from pulse.web.ingest import (
    BATCH_URL,
    DEVICE_PATH,
    INGEST_PREFIX,
    TOKEN_HEADER,
    Reply,
    batch_reply,
    reply,
)

_TOKEN = TOKEN_HEADER.lower().encode()
_JSON = (b"content-type", b"application/json")


class DeviceFastPath:
    """ASGI middleware: serves the device URLs, reads the bodies of the other ingest
    requests within the ingest buffer, and hands everything else to ``inner``."""

    def __init__(self, app: Quart, inner: Any) -> None:
        self._app = app
        self._inner = inner
        self._max_body = int(app.config["MAX_CONTENT_LENGTH"])

    def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> Coroutine[Any, Any, None]:
        # Not a coroutine itself: a connection handed on to Quart (a stream, for
        # as long as it is open) does not keep a frame of this call alive.
        if scope["type"] == "http" and scope["method"] == "POST" and _is_ingest(scope):
            length, token = _length_and_token(scope["headers"])
            if length is not None and length > self._max_body:
                pass  # Quart answers 413 without reading it
            elif length is not None and not scope.get("root_path"):
                if scope["path"] == BATCH_URL:
                    return self._serve_batch(scope, receive, send)
                if match := DEVICE_PATH.fullmatch(scope["path"]):
                    tenant_id, device_id, kind = match.groups()
                    return self._serve(kind, tenant_id, device_id, token, scope, receive, send)
                return self._buffered(scope, receive, send)
            else:
                return self._buffered(scope, receive, send)
        return cast(Coroutine[Any, Any, None], self._inner(scope, receive, send))

    async def _serve(
        self,
        kind: str,
        tenant_id: str,
        device_id: str,
        token: str | None,
        scope: Scope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        async def answer(body: bytes, receipt: Receipt, ingest: Ingest) -> Reply:
            item = (
                intake.reading(tenant_id, device_id, token, body, receipt.at)
                if kind == "telemetry"
                else intake.heartbeat(tenant_id, device_id, token)
            )
            [outcome] = await ingest([item], receipt)
            return reply(outcome)

        async def check_token(ingest: Ingest) -> Rejected | None:
            return await ingest.writer.check_token(tenant_id, device_id, token)

        if not token and expects_continue(scope):
            # Refused whatever its body (the ids, then the token): answered before the
            # client sends it, without 100 Continue (RFC 9110, section 10.1.1).
            refused = intake.heartbeat(tenant_id, device_id, None)
            assert isinstance(refused, Rejected)
            runtime_of(self._app).metrics.ingest_rejected.labels(refused.reason.code).inc()
            await send_reply(send, _unread(reply(refused), scope))
            return
        verify = (check_token, (tenant_id, device_id)) if token else None
        await self._answer(Receipt(kind), answer, scope, receive, send, verify=verify)

    async def _serve_batch(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        async def answer(body: bytes, receipt: Receipt, ingest: Ingest) -> Reply:
            items = intake.batch(body, receipt.at)
            if isinstance(items, Rejected):
                # The envelope itself is wrong: one error body, not per-message results.
                [outcome] = await ingest([items], receipt)
                return reply(outcome)
            return batch_reply(await ingest(items, receipt))

        await self._answer(Receipt("batch"), answer, scope, receive, send)

    async def _answer(
        self,
        receipt: Receipt,
        answer: Callable[[bytes, Receipt, Ingest], Awaitable[Reply]],
        scope: Scope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        *,
        verify: tuple[Callable[[Ingest], Awaitable[Rejected | None]], Device] | None = None,
    ) -> None:
        """Read the body within the ingest buffer, and send what ``answer`` makes of it.

        With the shared buffer more than half full, a request whose device token came
        in a header (``verify``) has it checked first: refused at once, body unread,
        or read into the budget of devices that proved themselves (pulse.ingest.buffer).
        """
        runtime = runtime_of(self._app)
        verified = None
        if verify is not None and runtime.ingest_buffer.under_pressure():
            check, device = verify
            try:
                refused = await check(runtime.ingest)
            except Exception as exc:
                await send_reply(send, _error_answer(exc, scope, runtime.metrics))
                return
            if refused is not None:
                runtime.metrics.ingest_rejected.labels(refused.reason.code).inc()
                await send_reply(send, _unread(reply(refused), scope))
                return
            verified = device
        with runtime.ingest_buffer.hold(verified) as holding:
            try:
                body = await read_body(
                    receive, holding, timeout=self._app.config["BODY_TIMEOUT"], limit=self._max_body
                )
                if body is None:  # the client went away
                    return
                reply_ = await answer(body, receipt, runtime.ingest)
            except Exception as exc:
                reply_ = _error_answer(exc, scope, runtime.metrics)
            await send_reply(send, reply_)

    async def _buffered(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """Read the body within the ingest buffer, then let Quart serve the request."""
        with runtime_of(self._app).ingest_buffer.hold() as holding:
            try:
                body = await read_body(
                    receive, holding, timeout=self._app.config["BODY_TIMEOUT"], limit=self._max_body
                )
            except Exception as exc:
                await send_reply(send, _error_answer(exc, scope, runtime_of(self._app).metrics))
                return
            if body is not None:
                await self._inner(scope, replay(body, receive), send)


def _is_ingest(scope: Scope) -> bool:
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        path = path[len(root_path) :]
    return path.startswith(INGEST_PREFIX)


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


def _error_answer(exc: Exception, scope: Scope, metrics: Metrics) -> Reply:
    error = error_for(exc)
    metrics.ingest_failed.labels(error.error.code).inc()
    answer = Reply(error.status, error_body(error.error, error.detail), error.headers)
    if isinstance(exc, ApiError) and exc.error is SERVER_BUSY:  # the rest is never read
        return _unread(answer, scope)
    return answer


def _unread(answer: Reply, scope: Scope) -> Reply:
    """An answer sent before the request's body was read: over HTTP/1 the connection
    ends with it (the body is never read; HTTP/2 ends just the stream, and forbids the
    header)."""
    if scope.get("http_version") in ("1.0", "1.1"):
        return dataclasses.replace(answer, headers={**answer.headers, "Connection": "close"})
    return answer


async def send_reply(send: ASGISendCallable, answer: Reply, *, api: bool = False) -> None:
    """An answer with a body known in full, sent the ASGI way; ``api``: one under /api/,
    with ``API_HEADERS`` as Quart's answers have them (``pulse.app``)."""
    fields = {**API_HEADERS, **answer.headers} if api else answer.headers
    headers = [(name.lower().encode(), value.encode()) for name, value in fields.items()]
    body = answer.body or b""
    if answer.body is not None:
        headers += [_JSON, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
