"""The telemetry stream over Server-Sent Events (CONTRACT section 5.2), resumed by Last-Event-ID."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
from collections.abc import AsyncGenerator, Iterable
from typing import cast

import httpx
import orjson

from pulse.client.backoff import Backoff
from pulse.client.credentials import Credentials
from pulse.client.errors import BadRequest, Forbidden, NotPulse, PulseClientError
from pulse.client.events import Telemetry
from pulse.client.stream import (
    AuthRejected,
    NoticeHandler,
    Reconnect,
    ReconnectingStream,
    describe,
    reset_detail,
)

SSE_PATH = "/api/v1/customer/telemetry/stream/sse"

# The server writes at least every PULSE_SSE_KEEPALIVE_S (15 s by default); three
# silent periods mean the connection is dead even if no FIN or RST arrived.
READ_TIMEOUT_S = 45.0


@dataclasses.dataclass
class SSEMessage:
    event: str | None
    id: str | None
    data: str


class SSEDecoder:
    """Lines in, messages out (the text/event-stream format). No I/O."""

    def __init__(self) -> None:
        self._event: str | None = None
        self._id: str | None = None
        self._data: list[str] = []

    def feed(self, line: str) -> SSEMessage | None:
        if line == "":
            if self._data or self._event is not None or self._id is not None:
                message = SSEMessage(self._event, self._id, "\n".join(self._data))
                self._event, self._id, self._data = None, None, []
                return message
            return None
        if line.startswith(":"):
            return None  # a comment: keepalive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            self._event = value
        elif field == "id":
            self._id = value
        elif field == "data":
            self._data.append(value)
        return None


def describe_position(transport: str, last_event_id: int | None) -> str:
    where = "live" if last_event_id is None else f"after event {last_event_id}"
    return f"{transport}, {where}"


def csv(values: Iterable[str] | None) -> str | None:
    return None if values is None else ",".join(sorted(values))


class SSETelemetryStream(ReconnectingStream[Telemetry]):
    """Telemetry events in id order, exactly once, across reconnects and server restarts.

    Started without ``last_event_id`` the stream is live from its first
    connection; the position is known from the first event on.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        credentials: Credentials,
        backoff: Backoff,
        *,
        device_ids: Iterable[str] | None = None,
        metrics: Iterable[str] | None = None,
        last_event_id: int | None = None,
        tenant_id: str | None = None,
        on_notice: NoticeHandler | None = None,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        super().__init__(credentials, backoff, on_notice)
        self.http = http
        self.device_ids = frozenset(device_ids) if device_ids is not None else None
        if self.device_ids is not None and not (self.device_ids and all(self.device_ids)):
            # The URL cannot say "no device" ("device_id=" means every one): refused, not
            # a stream of every device where a program meant none (an empty list, say).
            raise ValueError("device_ids holds no device id: None streams every device")
        self.metrics = frozenset(metrics) if metrics is not None else None
        self.tenant_id = tenant_id
        self.last_event_id = last_event_id
        self.read_timeout_s = read_timeout_s
        # Events at or below this id were delivered already: dropped if sent again.
        self.duplicates_dropped = 0
        self._response: httpx.Response | None = None  # the connection's, while open

    def _params(self) -> dict[str, str]:
        params = {
            "device_id": csv(self.device_ids),
            "metric": csv(self.metrics),
            "tenant_id": self.tenant_id,
        }
        return {k: v for k, v in params.items() if v}

    async def _session(self, token: str) -> AsyncGenerator[Telemetry, None]:
        headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        if self.last_event_id is not None:
            headers["Last-Event-ID"] = str(self.last_event_id)
        timeout = httpx.Timeout(10.0, read=self.read_timeout_s)
        try:
            async with self.http.stream(
                "GET", SSE_PATH, params=self._params(), headers=headers, timeout=timeout
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise http_failure(response)
                expect_type(response, "text/event-stream")
                self._response = response
                if self._stopped.is_set():  # stop() came while connecting
                    return
                self._connected(describe_position("SSE", self.last_event_id))
                decoder = SSEDecoder()
                try:
                    # Closed here, in order: not left to the garbage collector. (httpx
                    # types it an AsyncIterator; it is an async generator.)
                    lines = cast("AsyncGenerator[str, None]", response.aiter_lines())
                    async with contextlib.aclosing(lines):
                        async for line in lines:
                            message = decoder.feed(line)
                            if message is not None:
                                event = self._handle(message)
                                if event is not None:
                                    yield event
                finally:
                    self._response = None
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise Reconnect(f"cannot connect ({describe(exc)})") from exc
        except httpx.TransportError as exc:
            raise Reconnect(f"connection lost ({type(exc).__name__})") from exc

    def _interrupt(self) -> None:
        """Shut the connection's socket down (not close it: httpx still owns it): the
        read waiting on it ends at once, as a lost connection, and the stream, stopped,
        ends there rather than at the next keepalive."""
        response = self._response
        network = response.extensions.get("network_stream") if response is not None else None
        # A socket.socket, or asyncio's TransportSocket over one (which has shutdown()).
        sock = network.get_extra_info("socket") if network is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _handle(self, message: SSEMessage) -> Telemetry | None:
        try:
            return self._read(message)
        except (ValueError, KeyError, TypeError) as exc:  # orjson's errors are ValueErrors
            raise NotPulse(
                f"the stream sent an event Pulse does not send ({type(exc).__name__}: "
                f"{str(exc)[:100]}): is the URL Pulse's?"
            ) from None

    def _read(self, message: SSEMessage) -> Telemetry | None:
        if message.event == "reset":
            data = orjson.loads(message.data)
            self._notice("reset", reset_detail(data))
            if data.get("reason") == "unknown_position":
                # The tenant's history is behind our position (a new database?):
                # start again from its newest id.
                self.last_event_id = int(data["last_event_id"])
            return None
        if message.event == "lagging":
            self._notice("lagging", "the server dropped this client for falling behind")
            raise Reconnect("lagging", delay_s=0.0)
        if message.event == "error":
            raise Reconnect(f"server error: {message.data}")
        event = None
        if message.event in (None, "message") and message.data:
            event = Telemetry.from_wire(orjson.loads(message.data))
            if self.last_event_id is not None and event.id <= self.last_event_id:
                self.duplicates_dropped += 1
                return None
        if message.id:
            # Also on `heartbeat`: filtered-out events passed, resume after them.
            self.last_event_id = int(message.id)
        return event


def retry_after_s(response: httpx.Response) -> float | None:
    """The answer's Retry-After in seconds, when it gives one as a number."""
    value = response.headers.get("Retry-After", "")
    return float(value) if value.isdigit() else None


def expect_type(response: httpx.Response, media_type: str) -> None:
    """Raise NotPulse for a 200 that is not of ``media_type`` (a page at that URL)."""
    given = response.headers.get("content-type", "")
    if given.split(";")[0].strip().lower() != media_type:
        raise NotPulse(
            f"{response.request.url.copy_with(query=None)} answered {given or 'no type'}, not "
            f"{media_type}: is the URL Pulse's?"
        )


def pulse_error(body: bytes | bytearray) -> tuple[str, str] | None:
    """The code and sentence of Pulse's error body (``{"error": ..., "detail": ...}``);
    None for any other body: another server's page, a proxy's answer."""
    try:
        error = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(error, dict) or not isinstance(error.get("error"), str):
        return None
    return error["error"], str(error.get("detail") or "")


def not_pulse_answer(response: httpx.Response) -> NotPulse:
    """A refusal whose body is not Pulse's error: what answered is something else."""
    given = response.headers.get("content-type", "").split(";")[0].strip() or "no type"
    moved = response.headers.get("location")
    to = f" (to {moved[:200]})" if moved else ""  # an http:// URL of an https:// server
    return NotPulse(
        f"{response.request.url.copy_with(query=None)} answered {response.status_code}{to} "
        f"with {given}, not Pulse's JSON error: is the URL Pulse's?",
        response.status_code,
    )


def http_failure(response: httpx.Response) -> Exception:
    """A non-200 answer: what to do about it (raise the result)."""
    status = response.status_code
    error = pulse_error(response.content)
    if status == 429 or status >= 500:
        # Busy or failing: asked again, whoever said it (a proxy in front of a Pulse
        # that restarts answers 502 with a page of its own).
        code = error[0] if error else str(status)
        return Reconnect(f"{status} {code}", min_delay_s=retry_after_s(response) or 0.0)
    if error is None:
        # Not the page itself as the reason (`pulse tail: 404 404: <!DOCTYPE HTML>...`).
        return not_pulse_answer(response)
    code, detail = error
    if status == 401:
        return AuthRejected(code, detail)
    if status == 403:
        return Forbidden(status, code, detail)
    if status == 400:
        return BadRequest(status, code, detail)
    return PulseClientError(status, code, detail)
