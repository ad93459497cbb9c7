"""The reconnect loop shared by every stream: backoff, token refresh, notices.

A stream subclass implements ``_session(token)``: one connection, yielding
events, ending by raising ``Reconnect`` (or returning) when the connection is
gone, ``AuthRejected`` when the token was refused, or one of the fatal
``PulseClientError``s. It calls ``_connected()`` once the server accepted it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

import orjson

from pulse.client.backoff import Backoff
from pulse.client.credentials import Credentials
from pulse.client.errors import AuthenticationFailed
from pulse.client.events import Notice, NoticeKind

E = TypeVar("E")

NoticeHandler = Callable[[Notice], None]


class Reconnect(Exception):
    """This connection is over; connect again after a delay.

    ``delay_s``: exactly this long (0: at once, e.g. after ``lagging``);
    None: the next backoff delay, but at least ``min_delay_s`` (a Retry-After), plus
    jitter (``Backoff.after``).
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


def reset_detail(reset: dict[str, Any]) -> str:
    """A reset's notice detail, the same from either transport: its fields as compact
    JSON (an SSE reset's data; a WebSocket's message without its ``type``)."""
    return orjson.dumps({k: v for k, v in reset.items() if k != "type"}).decode()


class ReconnectingStream(Generic[E]):
    """An async iterator of events that survives disconnects; ``aclose()`` ends it.

    The stream is its own iterator, over one ``_run`` generator that only the stream
    touches: a generator (and the connection's, inside it) is closed by the stream
    in order, never by another task while it runs, nor left for the garbage
    collector, which finalizes the nested generators of a cycle all at once ("athrow():
    asynchronous generator is already running" at exit).
    """

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
        self._iterator: AsyncGenerator[E, None] | None = None
        self._refreshed = False
        self._stopped = asyncio.Event()  # stop(): no more connections
        self._running = False  # a task is inside __anext__ (waiting for the next event)
        self._closing = False  # aclose() is closing the generator
        self._ended = asyncio.Event()  # the generator is done: returned, raised or closed

    def __aiter__(self) -> ReconnectingStream[E]:
        return self

    async def __anext__(self) -> E:
        if self._ended.is_set():
            raise StopAsyncIteration
        if self._closing:  # by another task, while this one was between two events
            await self._ended.wait()
            raise StopAsyncIteration
        if self._iterator is None:
            self._iterator = self._run()
        self._running = True
        try:
            return await self._iterator.__anext__()
        except BaseException:
            # Whatever leaves a generator's __anext__ but an event ends it.
            self._ended.set()
            raise
        finally:
            self._running = False

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def aclose(self) -> None:
        """End the stream, from the task iterating it or any other; its connection is
        closed when this returns. A task waiting for the next event sees its iteration
        end."""
        self.stop()
        if self._running:
            # Another task is inside the generator: stop() cut its connection, and that
            # task ends the generator (closing it from here would be "already running").
            await self._ended.wait()
        elif self._iterator is None:
            self._ended.set()  # never iterated: nothing to close
        elif not self._closing and not self._ended.is_set():
            self._closing = True
            try:
                await self._iterator.aclose()
            finally:
                self._ended.set()
        else:
            await self._ended.wait()

    def stop(self) -> None:
        """End the stream from anywhere (another task, a signal handler, the client
        closing), without waiting: its connection is cut, no other is made, and its
        iteration ends."""
        self._stopped.set()
        self._interrupt()

    def _interrupt(self) -> None:
        """Cut the connection the stream is on now, if any, so that a task waiting on it
        wakes up at once."""

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

    async def _run(self) -> AsyncGenerator[E, None]:
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
                delay = self.backoff.after(reason.min_delay_s)
            self._notice("disconnected", reason.detail, delay)
            with contextlib.suppress(TimeoutError):  # the delay, or until stop()
                await asyncio.wait_for(self._stopped.wait(), delay)
