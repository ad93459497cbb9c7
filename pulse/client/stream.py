"""The reconnect loop shared by every stream: backoff, token refresh, notices.

A stream subclass implements ``_session(token)``: one connection, yielding
events, ending by raising ``Reconnect`` (or returning) when the connection is
gone, ``AuthRejected`` when the token was refused, or one of the fatal
``PulseClientError``s. It calls ``_connected()`` once the server accepted it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType
from typing import Generic, TypeVar

from pulse.client.backoff import Backoff
from pulse.client.credentials import Credentials
from pulse.client.errors import AuthenticationFailed
from pulse.client.events import Notice, NoticeKind

E = TypeVar("E")

NoticeHandler = Callable[[Notice], None]


class Reconnect(Exception):
    """This connection is over; connect again after a delay.

    ``delay_s``: exactly this long (0: at once, e.g. after ``lagging``);
    None: the next backoff delay, but at least ``min_delay_s`` (a Retry-After).
    """

    def __init__(
        self, detail: str, *, delay_s: float | None = None, min_delay_s: float = 0.0
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.delay_s = delay_s
        self.min_delay_s = min_delay_s


class AuthRejected(Exception):
    """The server refused the token (401, close 4001): refresh it once, then give up."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.detail = detail


def describe(exc: BaseException) -> str:
    """An exception in one line, for a notice: its type, and its message if it has one."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class ReconnectingStream(Generic[E]):
    """An async iterator of events that survives disconnects; ``aclose()`` ends it."""

    def __init__(
        self,
        credentials: Credentials,
        backoff: Backoff,
        on_notice: NoticeHandler | None = None,
    ) -> None:
        self.credentials = credentials
        self.backoff = backoff
        self.on_notice = on_notice
        self.connections = 0
        self._iterator: AsyncIterator[E] | None = None
        self._refreshed = False
        self._stopped = asyncio.Event()  # stop(): no more connections

    def __aiter__(self) -> AsyncIterator[E]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    async def __anext__(self) -> E:
        return await self.__aiter__().__anext__()

    async def aclose(self) -> None:
        if self._iterator is not None:
            await self._iterator.aclose()  # type: ignore[attr-defined]

    def stop(self) -> None:
        """End the stream from anywhere (another task, the client closing): its
        connection is cut, no other is made, and its iteration ends. ``aclose`` can
        only be called by the one iterating, between two events."""
        self._stopped.set()
        self._interrupt()

    def _interrupt(self) -> None:
        """Cut the connection the stream is on now, if any (a WebSocket's; an SSE
        stream ends at its next line, a keepalive at most 15 s away, or at once when
        its client closes)."""

    async def __aenter__(self) -> ReconnectingStream[E]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _session(self, token: str) -> AsyncGenerator[E, None]:
        raise NotImplementedError

    def _connected(self, detail: str = "") -> None:
        self.connections += 1
        self.backoff.reset()
        self._refreshed = False
        self._notice("connected", detail)

    def _notice(self, kind: NoticeKind, detail: str = "", retry_in_s: float | None = None) -> None:
        if self.on_notice is not None:
            self.on_notice(Notice(kind, detail, retry_in_s))

    async def _run(self) -> AsyncIterator[E]:
        while not self._stopped.is_set():
            token = await self.credentials.current()
            try:
                # aclosing: a consumer that stops (aclose, an exception) closes the
                # connection now, not whenever the garbage collector finalizes it.
                async with contextlib.aclosing(self._session(token)) as session:
                    async for event in session:
                        if self._stopped.is_set():
                            return
                        yield event
                reason = Reconnect("the server ended the stream")
            except Reconnect as exc:
                if self._stopped.is_set():
                    return
                reason = exc
            except AuthRejected as exc:
                # One refresh per failure: a refreshed token that is refused too
                # will not get better by asking again.
                if not self.credentials.can_refresh or self._refreshed:
                    raise AuthenticationFailed(401, exc.code, exc.detail) from None
                await self.credentials.refresh()
                self._refreshed = True
                self._notice("token_refreshed", exc.code)
                continue
            if reason.delay_s is not None:
                delay = reason.delay_s
            else:
                delay = max(reason.min_delay_s, self.backoff.next_delay())
            self._notice("disconnected", reason.detail, delay)
            with contextlib.suppress(TimeoutError):  # the delay, or until stop()
                await asyncio.wait_for(self._stopped.wait(), delay)
