"""The reference Python client for Pulse streams (see docs/client.md).

async with PulseClient("http://127.0.0.1:8000", token) as pulse:
    async for event in pulse.sse(metrics=["temp"]):
        print(event.id, event.device_id, event.metrics)

Its names are imported on first use: a process that only registers `pulse tail`'s
arguments (every `pulse` command does) does not load the HTTP and WebSocket
libraries (about 9 MB of a server's memory).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pulse.client.backoff import Backoff
    from pulse.client.client import PulseClient
    from pulse.client.errors import (
        AuthenticationFailed,
        BadRequest,
        ExportCut,
        Forbidden,
        NotPulse,
        PulseClientError,
    )
    from pulse.client.events import (
        Alert,
        AlertsUpdate,
        FleetSummary,
        Notice,
        Telemetry,
        V2Event,
    )
    from pulse.client.sse import SSETelemetryStream
    from pulse.client.websocket import V2Stream, WebSocketTelemetryStream

_WHERE = {
    "Backoff": "backoff",
    "PulseClient": "client",
    "AuthenticationFailed": "errors",
    "BadRequest": "errors",
    "ExportCut": "errors",
    "Forbidden": "errors",
    "NotPulse": "errors",
    "PulseClientError": "errors",
    "Alert": "events",
    "AlertsUpdate": "events",
    "FleetSummary": "events",
    "Notice": "events",
    "Telemetry": "events",
    "V2Event": "events",
    "SSETelemetryStream": "sse",
    "V2Stream": "websocket",
    "WebSocketTelemetryStream": "websocket",
}
__all__ = [
    "Alert",
    "AlertsUpdate",
    "AuthenticationFailed",
    "Backoff",
    "BadRequest",
    "ExportCut",
    "FleetSummary",
    "Forbidden",
    "NotPulse",
    "Notice",
    "PulseClient",
    "PulseClientError",
    "SSETelemetryStream",
    "Telemetry",
    "V2Event",
    "V2Stream",
    "WebSocketTelemetryStream",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'pulse.client' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pulse.client.{_WHERE[name]}"), name)
