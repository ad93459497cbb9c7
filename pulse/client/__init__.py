"""The reference Python client for Pulse streams (see docs/client.md).

async with PulseClient("http://127.0.0.1:8000", token) as pulse:
    async for event in pulse.sse(metrics=["temp"]):
        print(event.id, event.device_id, event.metrics)
"""

from pulse.client.backoff import Backoff
from pulse.client.client import PulseClient
from pulse.client.errors import AuthenticationFailed, BadRequest, Forbidden, PulseClientError
from pulse.client.events import Alert, AlertsUpdate, FleetSummary, Notice, Telemetry, V2Event
from pulse.client.sse import SSETelemetryStream
from pulse.client.websocket import V2Stream, WebSocketTelemetryStream

__all__ = [
    "Alert",
    "AlertsUpdate",
    "AuthenticationFailed",
    "Backoff",
    "BadRequest",
    "FleetSummary",
    "Forbidden",
    "Notice",
    "PulseClient",
    "PulseClientError",
    "SSETelemetryStream",
    "Telemetry",
    "V2Event",
    "V2Stream",
    "WebSocketTelemetryStream",
]
