"""PulseClient: the one object a Python program needs to consume Pulse."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from pulse.client.arguments import address_problem
from pulse.client.backoff import Backoff, BusyWait
from pulse.client.credentials import Credentials, TokenRefresh
from pulse.client.errors import AuthenticationFailed, ExportCut, NotPulse, PulseClientError
from pulse.client.events import Alert, FleetSummary
from pulse.client.history import (
    EXPORT_READ_TIMEOUT_S,
    History,
    Reading,
    history_params,
    readings_page,
)
from pulse.client.resume import RawExportTail
from pulse.client.sse import SSETelemetryStream, expect_type, http_failure, retry_after_s
from pulse.client.stream import AuthRejected, NoticeHandler, ReconnectingStream, describe
from pulse.client.websocket import V2Stream, WebSocketTelemetryStream
from pulse.names import is_valid_id, is_valid_name, shown_name

ALERTS_PATH = "/api/v1/customer/alerts"
DEVICES_PATH = "/api/v1/customer/devices"
FLEET_HISTORY_PATH = "/api/v1/customer/telemetry/history"
EXPORT_TYPES = {"csv": "text/csv", "ndjson": "application/x-ndjson"}
# A cut raw export is asked for again after these answers too: a server restarting, or
# one that still holds the cut export's slot.
RESUMED_STATUS = frozenset({429, 502, 503, 504})
# A server too busy for a request now (429 history_limit, export_limit; 503 while the
# database is unreachable or the server restarts): asked again after its Retry-After.
BUSY_STATUS = frozenset({429, 503})
# The only requests asked again when refused busy: reads, which change nothing. A POST
# (acknowledge, close) is raised at once; the caller knows whether to send it again.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD"})
# A read no server answered, sent again within busy_wait_s: not reached, or the
# connection lost before the answer (a restart). Not a timeout (the server may still be
# working on the first), nor a URL without a scheme (UnsupportedProtocol).
RETRIED_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
# How long a read (history, fleet_summary, alerts...) waits out busy answers by default.
BUSY_WAIT_S = 30.0
OnWait = Callable[[PulseClientError, float], object]
S = TypeVar("S", bound=ReconnectingStream[Any])
T = TypeVar("T")


class PulseClient:
    """Streams and a few REST calls against one Pulse server, as one tenant.

    ``token``: a JWT; ``refresh_token``: called (sync or async) for a new one
    when the current one is refused or about to expire. ``tenant_id`` is for
    operators, who name the tenant they read. Every stream reconnects with
    exponential backoff and full jitter (``backoff_base_s`` doubling up to
    ``backoff_cap_s``), resumes from its last event id and re-sends its
    filters and subscriptions.

    A read the server is too busy for (``429 history_limit`` when the tenant's
    history slots are taken, ``503``) is asked again after each answer's
    Retry-After for up to ``busy_wait_s`` seconds in all (0: never), then raised;
    so is one no server answered (a restart: every second, told as ``unreachable``).
    ``on_busy(refusal, delay_s)`` is told each wait. POSTs are never asked again.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        refresh_token: TokenRefresh | None = None,
        tenant_id: str | None = None,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        on_notice: NoticeHandler | None = None,
        busy_wait_s: float = BUSY_WAIT_S,
        on_busy: OnWait | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        if busy_wait_s < 0:
            raise ValueError("busy_wait_s must be 0 or more")
        # Checked here: a URL without a scheme was a lost connection to the SSE stream,
        # tried again for ever.
        if (problem := address_problem(base_url)) is not None:
            raise ValueError(problem)
        self.base_url = base_url.rstrip("/")
        self.credentials = Credentials(token, refresh_token)
        self.tenant_id = tenant_id
        self.on_notice = on_notice
        self.busy_wait_s = busy_wait_s
        self.on_busy = on_busy
        self._backoff: Callable[[], Backoff] = lambda: Backoff(backoff_base_s, backoff_cap_s)
        self._owns_http = http is None
        self.http = http or httpx.AsyncClient(base_url=self.base_url, timeout=10.0)
        # Held until they end or the client closes, which closes them in order: a
        # stream left after `break` is not the garbage collector's to finalize.
        self._streams: set[ReconnectingStream[Any]] = set()

    def _made(self, kind: Callable[..., S], where: Any, **options: Any) -> S:
        """A stream of ``kind`` on ``where`` (the HTTP client, or the base URL) with this
        client's credentials, backoff, tenant and notices, stopped when it closes."""
        stream = kind(
            where,
            self.credentials,
            self._backoff(),
            tenant_id=self.tenant_id,
            on_notice=self.on_notice,
            **options,
        )
        self._streams = {s for s in self._streams if not s.ended}
        self._streams.add(stream)
        return stream

    async def aclose(self) -> None:
        """End the streams made by this client (their iterations end, their connections
        are closed), then close."""
        streams, self._streams = self._streams, set()
        for stream in streams:
            stream.stop()  # every connection cut at once, then each closed
        await asyncio.gather(*(stream.aclose() for stream in streams))
        if self._owns_http:
            await self.http.aclose()

    async def __aenter__(self) -> PulseClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # Streams

    def sse(
        self,
        *,
        device_ids: Iterable[str] | None = None,
        metrics: Iterable[str] | None = None,
        last_event_id: int | None = None,
    ) -> SSETelemetryStream:
        """Telemetry over Server-Sent Events; ``last_event_id`` resumes after that id."""
        return self._made(
            SSETelemetryStream,
            self.http,
            device_ids=device_ids,
            metrics=metrics,
            last_event_id=last_event_id,
        )

    def websocket(
        self,
        *,
        device_ids: Iterable[str] | None = None,
        metrics: Iterable[str] | None = None,
        last_event_id: int | None = None,
    ) -> WebSocketTelemetryStream:
        """Telemetry over the WebSocket; filters can change while it runs."""
        return self._made(
            WebSocketTelemetryStream,
            self.base_url,
            device_ids=device_ids,
            metrics=metrics,
            last_event_id=last_event_id,
        )

    def v2(
        self, *, fleet: bool = False, alerts: bool = False, device_ids: Iterable[str] = ()
    ) -> V2Stream:
        """The legacy v2 channels: ``FleetSummary``, ``AlertsUpdate`` and ``Telemetry``."""
        return self._made(
            V2Stream, self.base_url, fleet=fleet, alerts=alerts, device_ids=device_ids
        )

    # REST

    async def fleet_summary(self) -> FleetSummary:
        return await self._request(
            "GET", "/api/v1/customer/fleet/summary", parse=FleetSummary.from_wire
        )

    async def alerts(self, status: str | None = "active", *, page_size: int = 50) -> list[Alert]:
        """Every alert with this ``status`` (None: every status), newest first.

        Follows ``next_cursor`` through every page (``page_size`` alerts a
        request, 1 to 500); ``iter_alerts`` yields them page by page instead.
        """
        return [alert async for alert in self.iter_alerts(status, page_size=page_size)]

    async def iter_alerts(
        self, status: str | None = "active", *, page_size: int = 50
    ) -> AsyncIterator[Alert]:
        """As ``alerts``, one page in memory at a time, fetched as the loop gets to it."""
        params = {"limit": str(page_size)}
        if status:
            params["status"] = status
        while True:
            alerts, cursor = await self._request(
                "GET", ALERTS_PATH, params=params, parse=alerts_page
            )
            for alert in alerts:
                yield alert
            if cursor is None:
                return
            params["cursor"] = cursor

    async def acknowledge_alert(self, alert_id: int | str) -> Alert:
        """Mark it ``ACKNOWLEDGED`` (tenant-admin); returns the alert as it is now."""
        path = f"{ALERTS_PATH}/{quote(str(alert_id), safe='')}/acknowledge"
        return await self._request("POST", path, parse=Alert.from_wire)

    async def close_alert(self, alert_id: int | str) -> Alert:
        """Mark it ``CLOSED`` (tenant-admin); returns the alert as it is now."""
        path = f"{ALERTS_PATH}/{quote(str(alert_id), safe='')}/close"
        return await self._request("POST", path, parse=Alert.from_wire)

    # History (docs/history.md)

    async def history(
        self,
        device_id: str,
        *,
        metrics: Iterable[str] | None = None,
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        bucket: str = "auto",
        aggregates: Iterable[str] | None = None,
    ) -> History:
        """A device's series by metric over [start, end) (default: the last hour), in
        buckets (``bucket``: auto, 1m, 5m, 15m, 1h or 1d; auto may give raw points)."""
        if bucket == "raw":
            raise ValueError("bucket='raw' pages readings: use iter_readings")
        path = telemetry_path(device_id)
        params = history_params(start, end, bucket, list(aggregates or ()))
        if metrics:
            params["metrics"] = ",".join(metrics)
        return await self._request("GET", path, params=params, parse=History.from_wire)

    async def fleet_history(
        self,
        metric: str,
        *,
        device_ids: Iterable[str] | None = None,
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        bucket: str = "auto",
        aggregates: Iterable[str] | None = None,
    ) -> History:
        """One metric across the tenant's devices: ``series`` by device id."""
        params = history_params(start, end, bucket, list(aggregates or ()))
        params["metric"] = metric
        if device_ids:
            params["device_id"] = ",".join(device_ids)
        return await self._request(
            "GET", FLEET_HISTORY_PATH, params=params, parse=History.from_wire
        )

    async def iter_readings(
        self,
        device_id: str,
        *,
        metrics: Iterable[str] | None = None,
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        page_size: int = 1000,
    ) -> AsyncIterator[Reading]:
        """A device's raw readings in (device time, id) order, a page at a time. Without
        ``start``: those of the hour before the server's now when the first page is read."""
        path = telemetry_path(device_id)
        params = history_params(start, end, "raw", None)
        params["limit"] = str(page_size)
        if metrics:
            params["metrics"] = ",".join(metrics)
        while True:
            read = functools.partial(readings_page, params=params)
            readings, next_params = await self._request("GET", path, params=params, parse=read)
            for reading in readings:
                yield reading
            if next_params is None:
                return
            params = next_params

    async def export(
        self,
        device_id: str,
        *,
        format: str = "csv",
        metrics: Iterable[str] | None = None,
        start: datetime | str | None = None,
        end: datetime | str | None = None,
        bucket: str = "raw",
        aggregates: Iterable[str] | None = None,
        wait_s: float = 0.0,
        on_wait: OnWait | None = None,
        resume: int = 0,
        on_resume: Callable[[ExportCut, float], object] | None = None,
        read_timeout_s: float | None = EXPORT_READ_TIMEOUT_S,
    ) -> AsyncIterator[bytes]:
        """A device's export as it streams in: CSV or NDJSON bytes, of any size.

        A server streams a few exports at once (``429 export_limit``): for up to
        ``wait_s`` seconds the export is asked for again after each answer's
        Retry-After, before any byte of it is read; ``on_wait`` is told each refusal
        and the seconds it waits. Past ``wait_s``, the refusal is raised.

        An export that ends short (``ExportCut``: the server's PULSE_EXPORT_MAX_S, a
        restart, a lost connection) is raised; a raw one (``bucket="raw"``) is asked
        for again from where it stopped, up to ``resume`` times in a row, after a
        backoff delay that ``on_resume`` is told with the cut. Then only whole lines
        are yielded, none twice.

        Nothing from the server for ``read_timeout_s`` (its answer's head, or the next
        chunk; None: no limit) while the export waits is taken for a server gone: a
        cut, as a lost connection is (before any answer: httpx.ReadTimeout).
        """
        path = telemetry_path(device_id)
        if read_timeout_s is not None and not read_timeout_s > 0:
            raise ValueError("read_timeout_s must be more than 0, or None")
        params = history_params(start, end, bucket, list(aggregates or ()))
        if metrics:
            params["metrics"] = ",".join(metrics)
        headers = {"Accept": EXPORT_TYPES[format]}
        tail = RawExportTail(format) if resume > 0 and bucket == "raw" else None
        backoff = self._backoff()
        received = 0
        status = 0  # the last answer's; 0: none yet
        while True:
            try:
                async with self._stream(
                    "GET", path, params=params, headers=headers, busy_wait_s=wait_s,
                    on_wait=on_wait, read_timeout_s=read_timeout_s,
                ) as response:  # fmt: skip
                    status = response.status_code
                    async for chunk in response.aiter_bytes():
                        lines = tail.take(chunk) if tail else chunk
                        if lines:
                            backoff.reset()
                            received += len(lines)
                            yield lines
                if tail:
                    rest = tail.rest()
                    received += len(rest)
                    if rest:
                        yield rest
                return
            except (httpx.TransportError, PulseClientError) as exc:
                if status == 0:
                    raise  # never answered: not a cut
                if isinstance(exc, PulseClientError) and exc.status not in RESUMED_STATUS:
                    raise
                silent_s = read_timeout_s if isinstance(exc, httpx.ReadTimeout) else None
                if tail is None or backoff.attempt >= resume:
                    raise ExportCut(status, received, silent_s=silent_s) from exc
                delay_s = backoff.next_delay()
                if on_resume is not None:
                    on_resume(ExportCut(status, received, silent_s=silent_s), delay_s)
                await asyncio.sleep(delay_s)
                params = tail.resume(params)

    @contextlib.asynccontextmanager
    async def _stream(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str],
        headers: dict[str, str],
        busy_wait_s: float = 0.0,
        on_wait: OnWait | None = None,
        read_timeout_s: float | None = EXPORT_READ_TIMEOUT_S,
    ) -> AsyncIterator[httpx.Response]:
        """A request whose answer is read as it comes; failures raised as _request does.
        A busy answer is asked again after its Retry-After while ``busy_wait_s`` lasts.
        ``read_timeout_s`` bounds the wait for the head and for each next chunk."""
        params = {**params, **({"tenant_id": self.tenant_id} if self.tenant_id else {})}
        busy = BusyWait(busy_wait_s)
        refreshed = False
        while True:
            token = await self.credentials.current()
            request = self.http.build_request(
                method,
                path,
                params=params,
                headers={**headers, "Authorization": f"Bearer {token}"},
                timeout=httpx.Timeout(10.0, read=read_timeout_s),
            )
            response = await self.http.send(request, stream=True)
            try:
                if response.status_code == 401 and not refreshed and self.credentials.can_refresh:
                    refreshed = True
                    await self.credentials.refresh()
                    continue
                if not response.is_success:
                    await response.aread()
                    delay_s = self._wait_again(response, busy, on_wait)
                else:
                    accept = headers.get("Accept")
                    if accept:  # an export: a page at that URL is no export
                        expect_type(response, accept)
                    yield response
                    return
            finally:
                await response.aclose()
            await asyncio.sleep(delay_s)

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        parse: Callable[[Any], T],
    ) -> T:
        """One call's JSON answer, as ``parse`` reads it (NotPulse when it cannot: not
        an answer of Pulse's). A read the server is busy for is asked again (the same
        request: a page of readings goes on from its cursor) while ``busy_wait_s``
        lasts; anything else refused is raised."""
        params = dict(params or {})
        if self.tenant_id:
            params["tenant_id"] = self.tenant_id
        busy = BusyWait(self.busy_wait_s if method in IDEMPOTENT_METHODS else 0.0)
        refreshed = False
        while True:
            token = await self.credentials.current()
            try:
                response = await self.http.request(
                    method, path, params=params, headers={"Authorization": f"Bearer {token}"}
                )
            except RETRIED_ERRORS as exc:
                await asyncio.sleep(self._wait_unreachable(exc, busy, self.on_busy))
                continue
            if response.status_code == 401 and not refreshed and self.credentials.can_refresh:
                refreshed = True
                await self.credentials.refresh()
                continue
            if response.is_success:
                return parsed(response, parse)
            await asyncio.sleep(self._wait_again(response, busy, self.on_busy))

    def _wait_again(
        self, response: httpx.Response, busy: BusyWait, on_wait: OnWait | None
    ) -> float:
        """The seconds to wait before asking a refused request again, told to
        ``on_wait``; raises the refusal when it is not a busy one or ``busy`` is over."""
        failure = self._failure(response)
        if response.status_code not in BUSY_STATUS:
            raise failure
        delay_s = busy.delay_s(retry_after_s(response))
        if delay_s is None:
            if busy.waits:
                raise PulseClientError(
                    failure.status,
                    failure.code,
                    f"{failure.detail} Gave up after {busy.waits + 1} tries in "
                    f"{busy.waited_s():.1f} s (waiting at most {busy.wait_s:g} s).".strip(),
                ) from failure
            raise failure
        if on_wait is not None:
            on_wait(failure, delay_s)
        return delay_s

    @staticmethod
    def _wait_unreachable(exc: Exception, busy: BusyWait, on_wait: OnWait | None) -> float:
        """The seconds to wait before sending again a read the server did not answer
        (it could not be reached, or the connection was lost: a restart, a deploy),
        told to ``on_wait`` as a refusal coded ``unreachable``; raises ``exc`` itself
        once ``busy`` is over (at once for a POST: ``busy`` lasts 0 s for it)."""
        delay_s = busy.delay_s(None)
        if delay_s is None:
            raise exc
        if on_wait is not None:
            on_wait(PulseClientError(0, "unreachable", f"no answer ({describe(exc)})"), delay_s)
        return delay_s

    @staticmethod
    def _failure(response: httpx.Response) -> PulseClientError:
        failure = http_failure(response)
        if isinstance(failure, PulseClientError):
            return failure
        if isinstance(failure, AuthRejected):
            return AuthenticationFailed(response.status_code, failure.code, failure.detail)
        try:  # a busy or failing server (429, 5xx): its own error code and detail
            body = response.json()
            return PulseClientError(
                response.status_code, str(body["error"]), str(body.get("detail", ""))
            )
        except (ValueError, KeyError, TypeError):
            return PulseClientError(response.status_code, str(response.status_code), str(failure))


def telemetry_path(device_id: str) -> str:
    """A device's telemetry URL path, or ValueError before any request for an id that
    is none: pasted in as given, `h2?x=1` or `../devices` reached other endpoints, and
    httpx removed `.` and `..` (another endpoint answered, about its own parameters)."""
    if not is_valid_id(device_id):
        shown = repr(device_id) if is_valid_name(device_id) else shown_name(str(device_id))
        raise ValueError(
            f"{shown} is not a device id: 1 to 64 of [A-Za-z0-9_.:-], not '.' nor '..'"
        )
    return f"{DEVICES_PATH}/{quote(device_id, safe='')}/telemetry"


def alerts_page(page: dict[str, Any]) -> tuple[list[Alert], str | None]:
    """A page of alerts and the cursor of the next (None: the last page)."""
    alerts = [Alert.from_wire(alert) for alert in page["alerts"]]
    return alerts, str(page["next_cursor"]) if page.get("next_cursor") else None


def parsed(response: httpx.Response, parse: Callable[[Any], T]) -> T:
    """``parse`` of a 2xx answer's JSON; NotPulse when it is none of Pulse's (another
    server's page at that URL): json's or a KeyError, as it was, said nothing of why."""
    expect_type(response, "application/json")
    try:
        return parse(response.json())
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # json's: ValueErrors
        raise NotPulse(
            f"{response.request.url.copy_with(query=None)} answered JSON Pulse does not "
            f"send ({type(exc).__name__}: {str(exc)[:100]}): is the URL Pulse's?"
        ) from None
