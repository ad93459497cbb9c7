"""The scrape's series: no ``*_created`` beside the counters and histograms."""

from __future__ import annotations

from pulse.ops.metrics import Metrics


def test_no_created_series() -> None:
    """From the operations audit: every counter and histogram had a ``*_created``
    series too, which doubled a scrape's series."""
    metrics = Metrics()
    metrics.ingest_rejected.labels("rate_limited").inc()
    text = metrics.exposition().decode()
    assert 'pulse_ingest_rejected_total{reason="rate_limited"} 1.0' in text
    assert "_created" not in text
