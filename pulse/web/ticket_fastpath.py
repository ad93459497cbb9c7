"""Stream tickets issued straight from ASGI, before Quart: half of a dashboard's reconnect.

A browser dashboard takes a ticket (POST /api/v1/stream-ticket) before each
stream it opens, so after a deploy every dashboard asks for one at once. For
that small request Quart's machinery (two tasks and a wait, a request and its
werkzeug headers, the contexts, signals, a response object) cost more CPU than
the ticket itself. A POST without a body whose token is in the Authorization
header or the session cookie (from an allowed page) is answered here, through
the same ``grant`` and answer as the Quart route in ``pulse.web.tickets``.
Anything else goes on to Quart, and so does a request whose token is refused:
Quart then decides it from the start and words the refusal. Once the caller is
known, the answer is this door's, worded by the same error mapping as Quart's
handlers (``pulse.web.errors``).
"""

from __future__ import annotations

from collections.abc import Iterable

from werkzeug.datastructures import MultiDict
from werkzeug.http import parse_cookie

from pulse.auth.principal import Principal
from pulse.runtime import Runtime
from pulse.web import runtime_of
from pulse.web.asgi import ASGIReceiveCallable, ASGISendCallable, OneRoute, Scope
from pulse.web.auth import find_credential, is_allowed_origin
from pulse.web.fastpath import send_reply
from pulse.web.ingest import Reply, error_reply
from pulse.web.tickets import NO_STORE, TICKET_URL, grant, ticket_body

_WANTED = (b"authorization", b"cookie", b"origin", b"host")
_EMPTY: MultiDict[str, str] = MultiDict()


class TicketFastPath(OneRoute):
    """ASGI middleware: issues the tickets of callers with a valid token, and hands
    everything else to ``inner``."""

    method = "POST"
    path = TICKET_URL

    def takes(self, scope: Scope) -> bool:
        return _without_body(scope["headers"])

    async def _serve(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        rt = runtime_of(self._app)
        try:
            principal = await _caller(rt, scope["headers"])
        except Exception:
            principal = None  # refused: Quart decides again, and words the answer
        if principal is None:
            await self._inner(scope, receive, send)
            return
        try:
            answer = Reply(200, ticket_body(await grant(rt, principal), principal), NO_STORE)
        except Exception as exc:
            answer = error_reply(exc)
        await send_reply(send, answer, api=True)


async def _caller(rt: Runtime, headers: Iterable[tuple[bytes, bytes]]) -> Principal | None:
    """The caller, as the Quart route authenticates it: None without a token, or with
    the session cookie from a page that may not use it. Raises as the verifier does."""
    found: dict[bytes, str] = {}
    for name, value in headers:
        if name in _WANTED:
            found.setdefault(name, value.decode("latin1"))
    cookie = found.get(b"cookie")
    credential = find_credential(
        {"Authorization": found.get(b"authorization")},
        parse_cookie(cookie) if cookie else _EMPTY,
        _EMPTY,
        allow_query=False,
    )
    if credential is None:
        return None
    if credential.source == "cookie" and not is_allowed_origin(
        found.get(b"origin"), found.get(b"host"), rt.settings.allowed_origins
    ):
        return None
    return await rt.verifier.verify(credential.token)


def _without_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether the request declares no body: no Content-Length but 0, no Transfer-Encoding."""
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return False
    return True
