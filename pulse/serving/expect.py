"""``Expect: 100-continue`` answered when the app asks for the body, not with the head.

A client that sends ``Expect: 100-continue`` waits for ``100 Continue`` before it sends
its body, so that a request refused whatever its body (too large, no credential) costs
it nothing (RFC 9110, section 10.1.1). hypercorn 0.18 sent the 100 as soon as it had
parsed the head, before the app saw the request: a 5 MB upload with no credential got
``100 Continue`` and then 401.

Here (HTTP/1.1, hypercorn's asyncio worker) the 100 goes with the app's first
``receive()`` (``continue_on_first_receive``, in the app task's spawn:
``pulse.serving.direct``), as in uvicorn, and only if the client still waits for it (h11
knows: not once its body has begun to come). A final answer sent before that ends the
exchange without the body: it gets ``Connection: close``, which hypercorn then does
(the body is never read). An app that answers such requests before reading (Quart
reads every body at once, in a task of its own: ``pulse.web.expect``) is asked nothing.
Applied by ``pulse.serving.tuning``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

_CLOSE = (b"connection", b"close")


def _protocol_of(send: Any) -> Any:
    """The HTTP/1 protocol of the stream whose ``app_send`` is ``send`` (None otherwise)."""
    stream = getattr(send, "__self__", None)  # HTTPStream.app_send
    protocol = getattr(getattr(stream, "send", None), "__self__", None)  # H11Protocol.stream_send
    return protocol if getattr(protocol, "pulse_continues_when_asked", False) else None


def continue_on_first_receive(
    receive: Callable[[], Awaitable[Any]], send: Any
) -> Callable[[], Awaitable[Any]]:
    """``receive`` for an HTTP request's app: the first call sends ``100 Continue`` when
    the client waits for it; ``receive`` itself for every other request."""
    protocol = _protocol_of(send)
    if protocol is None or not protocol.connection.they_are_waiting_for_100_continue:
        return receive
    asked = False

    async def receive_continuing() -> Any:
        nonlocal asked
        if not asked:
            asked = True
            await protocol.send_continue()
        return await receive()

    return receive_continuing


def continue_when_asked() -> None:
    """hypercorn's HTTP/1 protocol without its 100 at the head (once)."""
    import h11
    import hypercorn.protocol as protocol

    base = protocol.H11Protocol  # type: ignore[attr-defined]
    if getattr(base, "pulse_continues_when_asked", False):
        return

    class _H11Protocol(base):  # type: ignore[misc, valid-type]
        pulse_continues_when_asked = True

        async def _send_h11_event(self, event: Any) -> None:
            if type(event) is h11.InformationalResponse and event.status_code == 100:
                return  # hypercorn's own, with the head: the app's first receive sends it
            if type(event) is h11.Response and self.connection.they_are_waiting_for_100_continue:
                # Answered before the body was asked for: it will not be read.
                headers = [header for header in event.headers if header[0] != b"connection"]
                event = h11.Response(
                    status_code=event.status_code, headers=[*headers, _CLOSE], reason=event.reason
                )
            await super()._send_h11_event(event)

        async def send_continue(self) -> None:
            if self.connection.they_are_waiting_for_100_continue:
                await super()._send_h11_event(
                    h11.InformationalResponse(
                        status_code=100, headers=self.config.response_headers("h11")
                    )
                )

    protocol.H11Protocol = _H11Protocol  # type: ignore[attr-defined]
