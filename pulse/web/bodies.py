"""Ingest request bodies, read before their senders are known, within the process's budget.

Every POST under ``/ingest/`` has its body read here (``pulse.web.fastpath``
calls ``read_body``), each received byte taken from the Runtime's
``IngestBuffer`` and given back once the request is answered. A request whose
bytes do not fit is answered 503 ``server_busy`` at once, and over HTTP/1 its
connection closed: the bytes still on their way are never read. The other
routes check the JWT first, and an unauthenticated request is answered (and its
body dropped) at once; Quart holds their bodies as they arrive, outside this
budget, so they take at most 64 KiB (``pulse.app.PulseRequest``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from werkzeug.exceptions import RequestTimeout

from pulse.errors import SERVER_BUSY, ApiError
from pulse.ingest.buffer import Holding
from pulse.web.asgi import ASGIReceiveCallable

BUSY_RETRY_AFTER_S = 1


async def read_body(
    receive: ASGIReceiveCallable, holding: Holding, *, timeout: float | None, limit: int
) -> bytes | None:
    """The whole body, or its first bytes past ``limit`` (for the caller to refuse as too
    large); None when the client went away. Raises ``server_busy`` when the buffer is
    full, RequestTimeout when the body does not arrive within ``timeout``."""
    chunks = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return None
                chunk = message.get("body", b"")
                if chunk:
                    if not holding.take(len(chunk)):
                        raise ApiError(
                            SERVER_BUSY,
                            "The server holds as many unfinished ingest bodies as it allows; "
                            "retry shortly.",
                            {"Retry-After": str(BUSY_RETRY_AFTER_S)},
                        )
                    chunks.append(chunk)
                    size += len(chunk)
                if not message.get("more_body", False) or size > limit:
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except TimeoutError:
        raise RequestTimeout() from None


def replay(body: bytes, receive: ASGIReceiveCallable) -> ASGIReceiveCallable:
    """``receive`` for an app that reads ``body`` again, then whatever comes next
    (the client's disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return receive_again
