"""The scrape's series: no ``*_created`` beside the counters and histograms."""

from __future__ import annotations

import httpx
import pytest

from pulse.config import Settings
from pulse.errors import CATALOGUE
from pulse.ops import metrics as metrics_module
from pulse.ops.metrics import Metrics
from tests.support import running_server


def test_no_created_series() -> None:
    """From the operations audit: every counter and histogram had a ``*_created``
    series too, which doubled a scrape's series."""
    metrics = Metrics()
    metrics.ingest_rejected.labels("rate_limited").inc()
    text = metrics.exposition().decode()
    assert 'pulse_ingest_rejected_total{reason="rate_limited"} 1.0' in text
    assert "_created" not in text


LABELLED = [
    ("pulse_ingest_rows_total", "endpoint", metrics_module.INGEST_ENDPOINTS),
    ("pulse_ingest_rejected_total", "reason", metrics_module.INGEST_REJECTIONS),
    ("pulse_ingest_failed_total", "error", metrics_module.INGEST_FAILURES),
    ("pulse_bus_read_failures_total", "error", ("database_unavailable", "error")),
]
BUS = [
    ("pulse_bus_resyncs_total", "reason", ("relay", "bus_back", "slow_consumer")),
    ("pulse_bus_messages_relayed_total", "kind", metrics_module.BUS_MESSAGE_KINDS),
    ("pulse_bus_publish_failures_total", "kind", metrics_module.BUS_MESSAGE_KINDS),
    ("pulse_bus_messages_received_total", "kind", metrics_module.BUS_MESSAGE_KINDS),
]
MQTT = [
    ("pulse_mqtt_messages_total", "outcome", metrics_module.MQTT_OUTCOMES),
    ("pulse_ingest_rows_total", "endpoint", ("mqtt",)),
]


def zeros(series: list[tuple[str, str, tuple[str, ...]]]) -> set[str]:
    return {f'{name}{{{label}="{v}"}} 0.0' for name, label, values in series for v in values}


@pytest.mark.parametrize(("bus", "mqtt"), [(False, False), (True, True)])
def test_known_label_values_are_at_zero_before_their_first_increment(bus: bool, mqtt: bool) -> None:
    """From the operations audit: pulse_ingest_failed_total{error},
    pulse_ingest_rejected_total{reason}, pulse_bus_resyncs_total and
    pulse_mqtt_messages_total appeared at their first increment, so Prometheus's
    increase() missed that first step (the first internal_error, the first resync)."""
    lines = set(Metrics(bus=bus, mqtt=mqtt).exposition().decode().splitlines())
    assert zeros(LABELLED) <= lines
    assert zeros(BUS) <= lines if bus else not zeros(BUS) & lines
    assert zeros(MQTT) <= lines if mqtt else not zeros(MQTT) & lines


def test_the_known_error_codes_are_the_catalogue_s() -> None:
    for code in metrics_module.INGEST_REJECTIONS + metrics_module.INGEST_FAILURES:
        assert code in CATALOGUE


async def test_a_fresh_server_s_metrics_have_the_series_at_zero(settings: Settings) -> None:
    async with running_server(settings) as url, httpx.AsyncClient(base_url=url) as http:
        lines = set((await http.get("/metrics")).text.splitlines())
    assert zeros(LABELLED) <= lines
    assert 'pulse_events_delivered_total{kind="sse"} 0.0' in lines
