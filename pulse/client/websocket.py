"""The telemetry WebSocket (CONTRACT 5.1) and the legacy v2 channels (5.3).

Both send the JWT in the handshake's Authorization header, which the server
reads before any query parameter: no token in URLs, no ticket needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedOK,
    InvalidHandshake,
    InvalidStatus,
)

from pulse.client.backoff import Backoff
from pulse.client.credentials import REFRESH_MARGIN_S, Credentials
from pulse.client.errors import (
    CLOSE_SENTENCES,
    BadRequest,
    Forbidden,
    NotPulse,
    PulseClientError,
)
from pulse.client.events import AlertsUpdate, FleetSummary, Telemetry, V2Event
from pulse.client.sse import csv, describe_position, pulse_error
from pulse.client.stream import (
    AuthRejected,
    NoticeHandler,
    Reconnect,
    ReconnectingStream,
    describe,
    reset_detail,
)
from pulse.names import is_valid_name

E = TypeVar("E")

# The server writes at least every PULSE_WS_PING_S (30 s by default) on the telemetry
# WebSocket, every PULSE_WS_KEEPALIVE_S (10 s) on v2 (a summary, or a ping frame):
# three silent periods while the stream waits mean the connection is dead even if no
# FIN or RST arrived.
READ_TIMEOUT_S = 90.0

TELEMETRY_WS_PATH = "/api/v1/customer/telemetry/stream"
V2_WS_PATH = "/api/v2/ws"
# What a v2 server sends but events (CONTRACT 5.3): replies to the actions.
V2_REPLIES = frozenset({"subscribed", "unsubscribed"})


def ws_url(base_url: str, path: str, params: dict[str, str | None]) -> str:
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    query = urlencode({k: v for k, v in params.items() if v})
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, query, ""))


def close_failure(code: int | None, reason: str) -> Exception:
    """A close frame from the server: what to do about it (raise the result)."""
    if code == 4001:
        reason = reason or "unauthorized"
        return AuthRejected(reason, CLOSE_SENTENCES.get(reason, ""))
    if code == 4003:
        reason = reason or "forbidden"
        return Forbidden(403, reason, CLOSE_SENTENCES.get(reason, ""))
    if code == 4000:
        reason = reason or "bad_request"
        return BadRequest(400, reason, CLOSE_SENTENCES.get(reason, ""))
    if code == 4008:
        return Reconnect("lagging", delay_s=0.0)
    if code == 4029:
        return Reconnect("connection limit reached", min_delay_s=5.0)
    return Reconnect(f"closed {code} {reason}".strip())


def pulse_message(raw: str | bytes) -> dict[str, Any]:
    """A message of Pulse's: a JSON object with a ``type``; NotPulse for anything else
    (another WebSocket service at that URL), which retrying would not change."""
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise not_pulse("a message that is not JSON", exc) from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise not_pulse("a message Pulse does not send", None)
    return message


def not_pulse(what: str, exc: Exception | None) -> NotPulse:
    cause = f" ({type(exc).__name__}: {str(exc)[:100]})" if exc is not None else ""
    return NotPulse(f"the WebSocket sent {what}{cause}: is the URL Pulse's?")


class _Connection(ClientConnection):
    """A client connection that knows when it last received anything, a ping frame too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_received = time.monotonic()

    def data_received(self, data: bytes) -> None:
        self.last_received = time.monotonic()
        super().data_received(data)


class _WebSocketStream(ReconnectingStream[E]):
    """A connection loop over one WebSocket URL; subclasses read its messages."""

    # Whether the server takes a fresh token on the open connection ({"action": "auth"}).
    renews_in_band = True

    def __init__(
        self,
        base_url: str,
        credentials: Credentials,
        backoff: Backoff,
        *,
        tenant_id: str | None,
        on_notice: NoticeHandler | None,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        super().__init__(credentials, backoff, on_notice)
        self.base_url = base_url
        self.tenant_id = tenant_id
        self.open_timeout_s = open_timeout_s
        # How long a closing handshake may wait for the server's close frame.
        self.close_timeout_s = 2.0
        self.read_timeout_s = read_timeout_s
        self._ws: ClientConnection | None = None
        # Since when the stream has waited for a message (None: its consumer is busy).
        self._waiting_since: float | None = None
        self._silent = False  # the connection was cut for read_timeout_s of silence

    def _url(self) -> str:
        raise NotImplementedError

    async def _on_open(self, ws: ClientConnection) -> None:
        """Right after the handshake: re-send what this stream had asked for."""

    def _received(self) -> None:
        """The server sent a message (any kind) on this connection."""

    def _read(self, message: dict[str, Any]) -> E | None:
        raise NotImplementedError

    async def _reply(self, message: dict[str, Any]) -> None:
        """After ``_read``: what the stream sends the server in answer to ``message``."""

    async def send(self, message: dict[str, Any]) -> None:
        """Send now if connected; the subclasses keep state so a reconnect re-sends it."""
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed):
                await self._ws.send(orjson.dumps(message).decode())

    async def _session(self, token: str) -> AsyncGenerator[E, None]:
        headers = {"Authorization": f"Bearer {token}"}
        self._silent = False
        try:
            async with connect(
                self._url(),
                additional_headers=headers,
                open_timeout=self.open_timeout_s,
                close_timeout=self.close_timeout_s,
                max_size=2**22,
                # No keepalive pings of the library's (every 20 s, closing 1011 when the
                # pong is 20 s late): a consumer busy with a burst stops reading, the
                # pong waits behind the unread frames, and the client cut its own
                # connection ~40 s in (v2, which does not resume, lost the events
                # between). The server pings and keeps the line busy; a dead server
                # is found by its silence while the stream waits (_watch).
                ping_interval=None,
                create_connection=_Connection,
            ) as ws:
                assert isinstance(ws, _Connection)
                self._ws = ws
                renew = asyncio.create_task(self._renew_token(ws))
                watch = asyncio.create_task(self._watch(ws))
                try:
                    await self._on_open(ws)
                    while True:
                        # recv(), not `async for raw in ws`: that is a generator of its
                        # own, which a consumer that stops would leave for the garbage
                        # collector to close (at exit, "already running").
                        self._waiting_since = time.monotonic()
                        try:
                            raw = await ws.recv()
                        except ConnectionClosedOK:
                            break
                        finally:
                            self._waiting_since = None
                        message = pulse_message(raw)
                        self._received()
                        kind = message["type"]
                        if kind == "auth_ok":
                            expires = message.get("expires_at")
                            self._notice("token_refreshed", f"accepted, expires {expires}")
                        elif kind == "error":
                            self._notice("error", str(message.get("message", "")))
                        else:
                            event = self._handle(message)
                            await self._reply(message)
                            if event is not None:
                                yield event
                except (GeneratorExit, asyncio.CancelledError):
                    # The consumer stopped (aclose, cancellation). A closing handshake
                    # would wait up to close_timeout: the server's close frame queues
                    # behind every message not read yet, and reading is paused while
                    # that queue is full (a replay). Nobody wants them: drop the line.
                    ws.transport.abort()
                    raise
                finally:
                    self._ws = None
                    renew.cancel()
                    watch.cancel()
                raise self._closed(ws.close_code, ws.close_reason or "")
        except InvalidStatus as exc:
            status = exc.response.status_code
            detail = f"handshake refused ({status})"
            error = pulse_error(exc.response.body or b"")
            if status < 400 or (status == 404 and error is None):
                # A page, a redirect, another server's "not found": no WebSocket of Pulse's.
                raise NotPulse(
                    f"{self._url().split('?')[0]} answered {status}, not a WebSocket "
                    "handshake of Pulse's: is the URL Pulse's?",
                    status,
                ) from None
            if status == 401:
                raise AuthRejected("unauthorized") from exc
            if status == 403:
                raise Forbidden(status, "forbidden", detail) from exc
            if status == 400:
                raise BadRequest(status, "bad_request", detail) from exc
            if status == 404:
                raise PulseClientError(status, error[0] if error else "not_found", detail) from exc
            wait = exc.response.headers.get("Retry-After", "")
            delay_s = float(wait) if wait.isascii() and wait.isdigit() else 0.0
            raise Reconnect(detail, min_delay_s=delay_s) from exc
        except ConnectionClosed as exc:
            if self._silent:
                detail = f"no data from the server in {self.read_timeout_s:g} s"
                raise Reconnect(detail) from exc
            if exc.sent is not None and (exc.rcvd is None or exc.rcvd_then_sent is False):
                # This client closed first (a message over max_size: 1009), whatever
                # the server echoed.
                sent = f"{exc.sent.code} {exc.sent.reason}".strip()
                raise Reconnect(f"this client closed the connection ({sent})") from exc
            if exc.rcvd is None:
                # No close frame either way: the server killed, the network cut. Not
                # "closed None", as it was reported.
                raise Reconnect("connection lost (no close frame)") from exc
            raise self._closed(exc.rcvd.code, exc.rcvd.reason) from exc
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise Reconnect(f"cannot connect ({describe(exc)})") from exc

    def _handle(self, message: dict[str, Any]) -> E | None:
        try:
            return self._read(message)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            kind = message["type"][:40]
            raise not_pulse(f"a {kind!r} message Pulse does not send", exc) from None

    def _closed(self, code: int | None, reason: str) -> Exception:
        """close_failure, and the notice an SSE stream gives for the same (lagging)."""
        if code == 4008:
            self._notice("lagging", "the server dropped this client for falling behind")
        return close_failure(code, reason)

    def _interrupt(self) -> None:
        if self._ws is not None:
            self._ws.transport.abort()

    async def _watch(self, ws: _Connection) -> None:
        """Cut a connection on which nothing came for read_timeout_s while the stream
        waited for a message: its server is gone (its machine, or the network between)
        without a FIN or a RST. A consumer busy with what came is no silence of the
        server's, however long it takes."""
        while True:
            await asyncio.sleep(self.read_timeout_s / 10)
            waiting = self._waiting_since
            if waiting is None:
                continue
            if time.monotonic() - max(waiting, ws.last_received) > self.read_timeout_s:
                self._silent = True
                ws.transport.abort()
                return

    async def _renew_token(self, ws: ClientConnection) -> None:
        """Before the token expires, send a fresh one so the connection lives on."""
        if not self.credentials.can_refresh or not self.renews_in_band:
            return
        while True:
            await asyncio.sleep(max(1.0, self.credentials.seconds_left() - REFRESH_MARGIN_S))
            try:
                token = await self.credentials.refresh()
            except Exception as exc:
                # Not fatal here: at expiry the server closes 4001, and the reconnect
                # asks the callback again, raising to the consumer if it still fails.
                self._notice("error", f"token refresh failed: {exc!r}")
                return
            # The reply, auth_ok or an error, comes through the reading loop.
            with contextlib.suppress(ConnectionClosed):
                await ws.send(orjson.dumps({"action": "auth", "token": token}).decode())


class WebSocketTelemetryStream(_WebSocketStream[Telemetry]):
    """Telemetry events in id order, exactly once, across reconnects and server restarts.

    Filters changed with ``subscribe``/``unsubscribe``/``set_metrics``/
    ``clear_filters`` are remembered and carried into every reconnect's URL, so that
    the replay of what was missed uses them. A malformed device id or metric name is
    refused at once (ValueError), never sent or kept. Once connected, the stream asks
    for what it wants beyond what the URL carried (a change made while the connection
    was being made, which went out on no connection).
    """

    def __init__(
        self,
        base_url: str,
        credentials: Credentials,
        backoff: Backoff,
        *,
        device_ids: Iterable[str] | None = None,
        metrics: Iterable[str] | None = None,
        last_event_id: int | None = None,
        tenant_id: str | None = None,
        on_notice: NoticeHandler | None = None,
    ) -> None:
        super().__init__(base_url, credentials, backoff, tenant_id=tenant_id, on_notice=on_notice)
        # None: every device (metric). An empty device set: no device at all.
        self.device_ids = frozenset(device_ids) if device_ids is not None else None
        self.metrics = frozenset(metrics) if metrics is not None else None
        # The filters as the server has them (its `connected` message and its replies
        # to the actions), to ask once connected for what the URL did not carry.
        self._granted: Filters = (self.device_ids, self.metrics or None)
        self.last_event_id = last_event_id
        self.duplicates_dropped = 0

    def _url(self) -> str:
        last = None if self.last_event_id is None else str(self.last_event_id)
        return ws_url(
            self.base_url,
            TELEMETRY_WS_PATH,
            {
                "device_id": csv(self.device_ids),
                "metric": csv(self.metrics),
                "last_event_id": last,
                "tenant_id": self.tenant_id,
            },
        )

    def _read(self, message: dict[str, Any]) -> Telemetry | None:
        kind = message.get("type")
        if kind == "telemetry":
            event = Telemetry.from_wire(message)
            if self.last_event_id is not None and event.id <= self.last_event_id:
                self.duplicates_dropped += 1
                return None
            self.last_event_id = event.id
            if self.device_ids is not None and event.device_id not in self.device_ids:
                # Sent before the server saw an unsubscribe, or "no device", which
                # has no URL form for a reconnect (an empty list means every device).
                return None
            return event
        if kind == "connected":
            if self.last_event_id is None:
                # Live from here: this is the exact position to resume from.
                self.last_event_id = int(message["last_event_id"])
            self._connected(describe_position("WebSocket", self.last_event_id))
        elif kind == "reset":
            self._notice("reset", reset_detail(message))
            if message.get("reason") == "unknown_position":
                self.last_event_id = int(message["last_event_id"])
        elif kind == "ping" and message.get("last_event_id") is not None:
            self.last_event_id = max(self.last_event_id or 0, int(message["last_event_id"]))
        self._granted = _granted(message, *self._granted)
        return None

    async def _reply(self, message: dict[str, Any]) -> None:
        if message.get("type") != "connected":
            return
        # Bring the server's filters to the stream's: what changed while the connection
        # was being made was sent on no connection.
        devices, metrics = self._granted
        if self.device_ids is None and devices is not None:
            await self.send({"action": "clear_filters"})
            devices = metrics = None
        elif self.device_ids is not None:
            if wanted := sorted(self.device_ids - (devices or frozenset())):
                await self.send({"action": "subscribe", "device_ids": wanted})
            if devices is not None and devices - self.device_ids:
                dropped = sorted(devices - self.device_ids)
                await self.send({"action": "unsubscribe", "device_ids": dropped})
        if (self.metrics or None) != metrics:
            await self.send({"action": "set_metrics", "metrics": sorted(self.metrics or ())})

    async def subscribe(self, device_ids: Iterable[str]) -> None:
        # From "every device", subscribing narrows the stream to the devices named.
        ids = _names(device_ids, "device id")
        self.device_ids = (self.device_ids or frozenset()) | set(ids)
        await self.send({"action": "subscribe", "device_ids": ids})

    async def unsubscribe(self, device_ids: Iterable[str]) -> None:
        ids = sorted(device_ids)
        if self.device_ids is None:
            raise ValueError("this stream follows every device; subscribe to a set first")
        self.device_ids = self.device_ids - set(ids)
        await self.send({"action": "unsubscribe", "device_ids": ids})

    async def set_metrics(self, metrics: Iterable[str]) -> None:
        self.metrics = frozenset(_names(metrics, "metric name"))
        await self.send({"action": "set_metrics", "metrics": sorted(self.metrics)})

    async def clear_filters(self) -> None:
        self.device_ids = self.metrics = None
        await self.send({"action": "clear_filters"})


Filters = tuple[frozenset[str] | None, frozenset[str] | None]


def _names(values: Iterable[str], what: str) -> list[str]:
    """``values`` sorted, or ValueError for one the server would refuse: kept, it would be
    in the next reconnect's URL, which the server would refuse whole."""
    names = sorted(values)
    for name in names:
        if not is_valid_name(name):
            raise ValueError(f"{name!r} is not a {what}: 1 to 64 characters of [A-Za-z0-9_.:-]")
    return names


def _granted(
    message: dict[str, Any], devices: frozenset[str] | None, metrics: frozenset[str] | None
) -> Filters:
    """The filters (devices, metrics; None: every one) the server has once it sent
    ``message``, from those it had before."""
    kind = message.get("type")
    if kind == "connected":
        given = message.get("filters") or {}
        return frozenset(given.get("device_ids") or ()) or None, frozenset(
            given.get("metrics") or ()
        ) or None
    if kind == "subscribed":
        return (devices or frozenset()) | set(message.get("device_ids") or ()), metrics
    if kind == "unsubscribed" and devices is not None:
        return devices - set(message.get("device_ids") or ()), metrics
    if kind == "metrics_updated":
        return devices, frozenset(message.get("metrics") or ()) or None
    if kind == "filters_cleared":
        return None, None
    return devices, metrics


class V2Stream(_WebSocketStream[V2Event]):
    """The legacy v2 channels: fleet summaries, active alerts, and device telemetry.

    v2 has no resume: telemetry sent while disconnected is not replayed (use
    the telemetry streams for that). Subscriptions are re-sent on reconnect,
    and the server answers them with the current fleet summary and alerts.
    Nor does it take a fresh token on the open connection: at the token's expiry
    the server closes it (4001) and the stream reconnects with a new one. It is
    connected (the ``connected`` notice, the backoff reset) once the server answers
    a subscription: a stream with none yet is at its first ``subscribe``.
    """

    renews_in_band = False

    def __init__(
        self,
        base_url: str,
        credentials: Credentials,
        backoff: Backoff,
        *,
        fleet: bool = False,
        alerts: bool = False,
        device_ids: Iterable[str] = (),
        tenant_id: str | None = None,
        on_notice: NoticeHandler | None = None,
    ) -> None:
        super().__init__(base_url, credentials, backoff, tenant_id=tenant_id, on_notice=on_notice)
        self.channels = {name for name, on in (("fleet", fleet), ("alerts", alerts)) if on}
        self.device_ids: set[str] = set(device_ids)
        # Whether the server has sent a message on this connection (its refusals are
        # closes, never messages).
        self._answered = False

    def _url(self) -> str:
        return ws_url(self.base_url, V2_WS_PATH, {"tenant_id": self.tenant_id})

    async def _on_open(self, ws: ClientConnection) -> None:
        # Not connected yet: the server accepts every v2 handshake and only then refuses
        # (1011 database_unavailable, 4029 at the tenant's limit). Counting the handshake
        # as a connection reset the backoff before each refusal: 80 reconnects in a 30 s
        # outage. The server's first message, the answer to a subscription (``error``
        # too: a malformed device id), is its acceptance.
        self._answered = False
        for channel in sorted(self.channels):
            await self.send({"action": "subscribe", "type": channel})
        for device_id in sorted(self.device_ids):
            await self.send({"action": "subscribe", "type": "device", "device_id": device_id})

    def _received(self) -> None:
        if not self._answered:
            self._answered = True
            self._connected("v2")

    def _read(self, message: dict[str, Any]) -> V2Event | None:
        kind = message.get("type")
        if kind == "telemetry":
            return Telemetry.from_wire(message)
        if kind == "alerts":
            return AlertsUpdate.from_wire(message)
        if kind == "fleet_summary":
            return FleetSummary.from_wire(message["data"])
        if kind not in V2_REPLIES:
            # A frozen protocol: a type it never had is another service's message.
            raise ValueError("not a message of Pulse's v2 channels")
        return None

    async def subscribe(self, channel: str, device_id: str | None = None) -> None:
        """``channel``: "fleet", "alerts" or "device" (with ``device_id``)."""
        if channel == "device":
            if not device_id:
                raise ValueError("device_id required for device subscription")
            self.device_ids.add(device_id)
            await self.send({"action": "subscribe", "type": "device", "device_id": device_id})
        else:
            self.channels.add(channel)
            await self.send({"action": "subscribe", "type": channel})

    async def unsubscribe(self, channel: str, device_id: str | None = None) -> None:
        if channel == "device":
            self.device_ids.discard(device_id or "")
            await self.send({"action": "unsubscribe", "type": "device", "device_id": device_id})
        else:
            self.channels.discard(channel)
            await self.send({"action": "unsubscribe", "type": channel})
