"""The client's sans-I/O parts: the SSE decoder, typed events, token expiry."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from pulse.auth.dev_tokens import mint_token
from pulse.client.credentials import Credentials, token_expiry
from pulse.client.events import Alert, FleetSummary, Telemetry
from pulse.client.sse import SSEDecoder, SSEMessage


def feed(lines: list[str]) -> list[SSEMessage]:
    decoder = SSEDecoder()
    return [m for m in map(decoder.feed, lines) if m is not None]


def test_sse_decoder_reads_ids_events_data_and_skips_comments() -> None:
    messages = feed(
        [
            "retry: 2000",
            "",
            "id: 7",
            'data: {"a": 1}',
            "",
            ": keepalive",
            "",
            "event: heartbeat",
            "id: 9",
            "data: {}",
            "",
            "event: reset",
            "data: {",
            "data: }",
            "",
        ]
    )
    assert messages == [
        SSEMessage(None, "7", '{"a": 1}'),
        SSEMessage("heartbeat", "9", "{}"),
        SSEMessage("reset", None, "{\n}"),
    ]


def test_typed_events_from_the_contract_shapes() -> None:
    event = Telemetry.from_wire(
        {
            "type": "telemetry",
            "id": 124,
            "device_id": "dev-0001",
            "data": {"time": "2026-11-27T17:00:00.000Z", "metrics": {"temp": 21.5, "on": True}},
        }
    )
    assert event == Telemetry(
        124, "dev-0001", datetime(2026, 11, 27, 17, tzinfo=UTC), {"temp": 21.5, "on": True}
    )
    summary = FleetSummary.from_wire(
        {"ONLINE": 10, "STALE": 2, "OFFLINE": 1, "total": 13, "active_alerts": 4}
    )
    assert summary == FleetSummary(10, 2, 1, 13, 4)
    alert = Alert.from_wire(
        {
            "alert_id": 3,
            "device_id": "d",
            "alert_type": "THRESHOLD",
            "severity": 4,
            "status": "OPEN",
            "summary": "temp > 30",
            "details": {"value": 31},
            "created_at": "2026-11-27T17:00:00Z",
            "updated_at": "2026-11-27T17:00:01Z",
        }
    )
    assert alert.severity == 4 and alert.created_at.tzinfo is not None


def test_the_clients_alert_has_every_field_of_the_servers() -> None:
    """The client parses what the server sends (pulse.fleet.alerts.AlertJson, the one
    shape), field for field: a field added to one and not the other fails here."""
    import dataclasses

    from pulse.fleet.alerts import AlertJson

    assert {f.name for f in dataclasses.fields(Alert)} == set(AlertJson.__annotations__)


async def test_credentials_refresh_ahead_of_expiry() -> None:
    calls = []

    async def refresh() -> str:
        calls.append(1)
        return mint_token("s" * 32, tenant_id="t1", lifetime_s=3600)

    nearly_expired = mint_token("s" * 32, tenant_id="t1", lifetime_s=5)
    assert token_expiry(nearly_expired) == pytest.approx(time.time() + 5, abs=2)
    credentials = Credentials(nearly_expired, refresh)
    fresh = await credentials.current()
    assert calls == [1] and fresh != nearly_expired
    assert await credentials.current() == fresh  # fresh enough: no second call
    assert token_expiry("not.a-jwt") is None
    with pytest.raises(ValueError):
        Credentials(None, None)
