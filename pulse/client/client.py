"""PulseClient: the one object a Python program needs to consume Pulse."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any

import httpx

from pulse.client.backoff import Backoff
from pulse.client.credentials import Credentials, TokenRefresh
from pulse.client.errors import AuthenticationFailed, PulseClientError
from pulse.client.events import Alert, FleetSummary
from pulse.client.sse import SSETelemetryStream, http_failure
from pulse.client.stream import AuthRejected, NoticeHandler
from pulse.client.websocket import V2Stream, WebSocketTelemetryStream

ALERTS_PATH = "/api/v1/customer/alerts"


class PulseClient:
    """Streams and a few REST calls against one Pulse server, as one tenant.

    ``token``: a JWT; ``refresh_token``: called (sync or async) for a new one
    when the current one is refused or about to expire. ``tenant_id`` is for
    operators, who name the tenant they read. Every stream reconnects with
    exponential backoff and full jitter (``backoff_base_s`` doubling up to
    ``backoff_cap_s``), resumes from its last event id and re-sends its
    filters and subscriptions.
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
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.credentials = Credentials(token, refresh_token)
        self.tenant_id = tenant_id
        self.on_notice = on_notice
        self._backoff: Callable[[], Backoff] = lambda: Backoff(backoff_base_s, backoff_cap_s)
        self._owns_http = http is None
        self.http = http or httpx.AsyncClient(base_url=self.base_url, timeout=10.0)

    async def aclose(self) -> None:
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
        return SSETelemetryStream(
            self.http,
            self.credentials,
            self._backoff(),
            device_ids=device_ids,
            metrics=metrics,
            last_event_id=last_event_id,
            tenant_id=self.tenant_id,
            on_notice=self.on_notice,
        )

    def websocket(
        self,
        *,
        device_ids: Iterable[str] | None = None,
        metrics: Iterable[str] | None = None,
        last_event_id: int | None = None,
    ) -> WebSocketTelemetryStream:
        """Telemetry over the WebSocket; filters can change while it runs."""
        return WebSocketTelemetryStream(
            self.base_url,
            self.credentials,
            self._backoff(),
            device_ids=device_ids,
            metrics=metrics,
            last_event_id=last_event_id,
            tenant_id=self.tenant_id,
            on_notice=self.on_notice,
        )

    def v2(
        self, *, fleet: bool = False, alerts: bool = False, device_ids: Iterable[str] = ()
    ) -> V2Stream:
        """The legacy v2 channels: ``FleetSummary``, ``AlertsUpdate`` and ``Telemetry``."""
        return V2Stream(
            self.base_url,
            self.credentials,
            self._backoff(),
            fleet=fleet,
            alerts=alerts,
            device_ids=device_ids,
            tenant_id=self.tenant_id,
            on_notice=self.on_notice,
        )

    # REST

    async def fleet_summary(self) -> FleetSummary:
        return FleetSummary.from_wire(await self._request("GET", "/api/v1/customer/fleet/summary"))

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
            page = await self._request("GET", ALERTS_PATH, params=params)
            for alert in page["alerts"]:
                yield Alert.from_wire(alert)
            if not page.get("next_cursor"):
                return
            params["cursor"] = str(page["next_cursor"])

    async def acknowledge_alert(self, alert_id: int | str) -> Alert:
        """Mark it ``ACKNOWLEDGED`` (tenant-admin); returns the alert as it is now."""
        return Alert.from_wire(await self._request("POST", f"{ALERTS_PATH}/{alert_id}/acknowledge"))

    async def close_alert(self, alert_id: int | str) -> Alert:
        """Mark it ``CLOSED`` (tenant-admin); returns the alert as it is now."""
        return Alert.from_wire(await self._request("POST", f"{ALERTS_PATH}/{alert_id}/close"))

    async def _request(
        self, method: str, path: str, *, params: dict[str, str] | None = None
    ) -> Any:
        params = dict(params or {})
        if self.tenant_id:
            params["tenant_id"] = self.tenant_id
        for attempt in range(2):
            token = await self.credentials.current()
            response = await self.http.request(
                method, path, params=params, headers={"Authorization": f"Bearer {token}"}
            )
            if response.status_code == 401 and attempt == 0 and self.credentials.can_refresh:
                await self.credentials.refresh()
                continue
            break
        if response.is_success:
            return response.json() if response.content else None
        failure = http_failure(response)
        if isinstance(failure, PulseClientError):
            raise failure
        code = failure.code if isinstance(failure, AuthRejected) else str(response.status_code)
        error = AuthenticationFailed if response.status_code == 401 else PulseClientError
        raise error(response.status_code, code, str(failure))
