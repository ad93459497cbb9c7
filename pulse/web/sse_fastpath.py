"""SSE streams opened straight from ASGI, before Quart: what a reconnect storm is made of.

After a deploy every dashboard comes back at once, and for each of those requests
Quart's machinery (two tasks and a wait, a request and its werkzeug headers, the
contexts, signals and a response object) cost about as much CPU as everything the
stream itself needs: the token, the limit check and the first position (taken before
the response head, as the route does). A GET of the SSE URL with a credential (a
token in the Authorization header, the session cookie or the ``token`` parameter, or
a one-time ``ticket``, the browser's way) is served here, through the same parsing,
checks, stream and body as the Quart route in ``pulse.web.sse``. A request refused
before anything is spent goes on to Quart, which then decides it from the start and
words the refusal. Once a ticket is spent, the answer is this door's: a refusal
after it (the tenant at its limit, the database away) is answered here, worded by
the same error mapping as Quart's handlers (``pulse.web.errors``); so is a ticket
that is unknown, used or expired, which Quart would only look up again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from pulse.auth.access import require_unexpired, tenant_for
from pulse.auth.principal import Principal
from pulse.db.errors import DatabaseUnavailable
from pulse.errors import INVALID_TICKET, ApiError
from pulse.runtime import Runtime
from pulse.streams.limits import LimitReached
from pulse.streams.live import Live
from pulse.streams.params import parse_event_id, parse_filters
from pulse.web import runtime_of
from pulse.web.asgi import (
    ASGIReceiveCallable,
    ASGISendCallable,
    OneRoute,
    Scope,
    header,
    query_args,
)
from pulse.web.auth import authenticate, scope_credential
from pulse.web.direct import DirectWrites, watch_inbound
from pulse.web.fastpath import send_reply
from pulse.web.ingest import Reply, error_reply
from pulse.web.sse import HEADERS, SSE_URL, chunks, limit_reached, open_stream, shutting_down

_HEADERS = [(name.lower().encode(), value.encode()) for name, value in HEADERS.items()]


class SseFastPath(OneRoute):
    """ASGI middleware: serves an admitted SSE request opened with a token or a ticket,
    and hands everything else to ``inner``."""

    method = "GET"
    path = SSE_URL

    async def _serve(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        rt = runtime_of(self._app)
        try:
            opened = await _admit(rt, scope)
        except Exception:
            opened = None  # refused or failed: Quart decides again, and words the answer
        if opened is None:
            await self._inner(scope, receive, send)
        elif isinstance(opened, Reply):
            await send_reply(send, opened, api=True)
        else:
            await _stream(rt, *opened, scope, receive, send)


async def _admit(rt: Runtime, scope: Scope) -> tuple[Live, DirectWrites | None] | Reply | None:
    """The stream of a request the Quart route would serve, in the same steps, or the
    refusal of one whose ticket was spent; None when it has no credential. Raises
    what the route would answer with an error, before anything is spent."""
    args = query_args(scope["query_string"])
    filters = parse_filters(args, max_device_filters=rt.settings.max_device_filters)
    last_event_id = parse_event_id(header(scope, b"last-event-id") or args.get("last_event_id"))
    if rt.draining:
        return error_reply(shutting_down())
    credential = scope_credential(scope, args, allow_query=True)
    requested = args.get("tenant_id")
    if credential is not None:
        principal = await rt.verifier.verify(credential.token)
        require_unexpired(principal)
        tenant_id = tenant_for(principal, requested)
        await rt.limits.check(tenant_id)
        return await open_stream(rt, principal, tenant_id, filters, last_event_id, scope=scope)
    ticket = args.get("ticket")
    if not ticket:
        return None

    # A refused redemption leaves the ticket unspent: Quart may then try it again. A
    # ticket unknown, used or expired is refused here, as Quart's route words it: Quart
    # would only look it up again (each lookup a write transaction, for any stranger).
    def accept(principal: Principal) -> None:  # as the route's (sse._accept)
        require_unexpired(principal)
        tenant_for(principal, requested)

    try:
        principal = await authenticate(rt, None, args, accept=accept)
    except ApiError as exc:
        if exc.error is not INVALID_TICKET:
            raise
        return error_reply(exc)
    tenant_id = tenant_for(principal, requested)
    try:
        await rt.limits.check(tenant_id)
        return await open_stream(rt, principal, tenant_id, filters, last_event_id, scope=scope)
    except LimitReached as exc:
        return error_reply(limit_reached(exc))
    except Exception as exc:
        return error_reply(exc)


async def _stream(
    rt: Runtime,
    stream: Live,
    writes: DirectWrites | None,
    scope: Scope,
    receive: ASGIReceiveCallable,
    send: ASGISendCallable,
) -> None:
    """Send the response until the stream ends or the client goes away.

    Quart watches for the client leaving with a task of its own; so does this
    where the server offers no watch of the request's events
    (``pulse.web.direct.watch_inbound``), and cancels the stream when it has:
    its slot and subscription end at once, not at the next write that fails.
    """
    task = asyncio.current_task()
    assert task is not None
    gone = False

    def went_away(_: object = None) -> None:
        nonlocal gone
        if not gone:
            gone = True
            task.cancel()

    def arrived(event: dict[str, Any]) -> None:
        if event["type"] == "http.disconnect":
            went_away()

    stop_watching = watch_inbound(scope, arrived, enabled=rt.settings.direct_writes)
    watcher = None
    if stop_watching is None:
        watcher = asyncio.get_running_loop().create_task(_disconnected(receive))
        watcher.add_done_callback(went_away)
    try:
        async with contextlib.AsyncExitStack() as held:
            # The slot before the head: a refusal is then a 429 or a 503 the client
            # can act on, not a 200 whose body ends at once.
            try:
                await held.enter_async_context(
                    rt.limits.hold("sse", stream.tenant_id, end=stream.end)
                )
            except LimitReached as exc:
                await send_reply(send, error_reply(limit_reached(exc)), api=True)
                return
            except DatabaseUnavailable as exc:
                await send_reply(send, error_reply(exc), api=True)
                return
            await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
            async with contextlib.aclosing(chunks(stream, writes)) as body:
                async for chunk in body:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            return  # the client went away: nothing left to do
        raise
    finally:
        if stop_watching is not None:
            stop_watching()
        if watcher is not None:
            watcher.remove_done_callback(went_away)
            watcher.cancel()


async def _disconnected(receive: ASGIReceiveCallable) -> None:
    """Return once the client has gone (a GET's one body event comes first)."""
    while (await receive())["type"] != "http.disconnect":
        pass
