"""Prometheus metrics, one registry per app so several apps can live in one process.

Under ``pulse serve --workers`` (``pulse.serving``) every worker keeps its values in
files of one folder (prometheus_client's multiprocess mode, chosen by
``PROMETHEUS_MULTIPROC_DIR`` before the library is imported), and a scrape, whichever
worker it reaches, answers for the whole instance: counters and histograms summed,
each gauge as its ``multiprocess_mode`` says. Gauges read from the process (``sample``)
are refreshed by every worker every ``REFRESH_S``, and by the one scraped at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

# No ``*_created`` series beside every counter and histogram (a timestamp of when the
# process made it, which doubled the series of a scrape; the operations audit): a
# restart shows as counters starting again, which rate() takes in its stride, and with
# ``--workers`` there were none anyway.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
# The label values the counters below are known to take (tests/ops/test_metrics.py
# checks them against the code's error codes).
INGEST_ENDPOINTS = ("telemetry", "heartbeat", "batch")  # and "mqtt" with MQTT
INGEST_REJECTIONS = (
    "invalid_device_token",
    "unknown_device",
    "invalid_payload",
    "payload_too_large",
    "rate_limited",
    "internal_error",
)
INGEST_FAILURES = (
    "database_unavailable",
    "server_busy",
    "request_timeout",
    "payload_too_large",
    "internal_error",
)
BUS_MESSAGE_KINDS = ("events", "wakeup", "signal", "heartbeat")
MQTT_OUTCOMES = ("stored", "duplicate", "heartbeat", "rejected", "retained")
REFRESH_S = 2.0


class Metrics:
    def __init__(self, *, bus: bool = True, mqtt: bool = True) -> None:
        """``bus``, ``mqtt``: whether this deployment has NATS and MQTT; without them
        their connection gauges are not made, where a 0 would look like an outage
        to an alert on it (docs/operations.md)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.shared_dir = os.environ.get(MULTIPROCESS_DIR) or None
        self._samples: list[tuple[Gauge, Callable[[], float]]] = []
        r = self.registry
        self.connections = Gauge(
            "pulse_stream_connections",
            "Open stream connections",
            ["kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.events_delivered = Counter(
            "pulse_events_delivered", "Events handed to stream clients", ["kind"], registry=r
        )
        self.events_delivered_directly = Counter(
            "pulse_events_delivered_directly",
            "Of the events handed to stream clients, those written by the hub itself "
            "to a client that had read everything before (no queue, no task woken)",
            ["kind"],
            registry=r,
        )
        self.events_dropped_lagging = Counter(
            "pulse_events_dropped_lagging",
            "Events not queued because the client was disconnected as lagging",
            ["kind"],
            registry=r,
        )
        self.lagging_disconnects = Counter(
            "pulse_lagging_disconnects", "Clients disconnected as lagging", ["kind"], registry=r
        )
        self.listener_reconnects = Counter(
            "pulse_listener_reconnects", "Reconnects of the LISTEN connection", registry=r
        )
        self.listener_connected = Gauge(
            "pulse_listener_connected",
            "1 while the LISTEN connection is up (of every worker)",
            registry=r,
            multiprocess_mode="livemin",
        )
        # NATS between processes (PULSE_BUS_URL): pulse.bus.relay, pulse.bus.nats_source.
        self.bus_messages_relayed = Counter(
            "pulse_bus_messages_relayed",
            "Messages this process published on the bus as the relay, by kind "
            "(events, wakeup, signal, heartbeat)",
            ["kind"],
            registry=r,
        )
        self.bus_events_relayed = Counter(
            "pulse_bus_events_relayed", "Events this process published as the relay", registry=r
        )
        self.bus_publish_failures = Counter(
            "pulse_bus_publish_failures",
            "Messages this process could not publish as the relay, by kind: NATS was away, "
            "or the server refused them (larger than its max_payload)",
            ["kind"],
            registry=r,
        )
        self.bus_messages_received = Counter(
            "pulse_bus_messages_received",
            "Messages of the tenants this process serves received from the bus, by kind",
            ["kind"],
            registry=r,
        )
        self.bus_gaps_filled = Counter(
            "pulse_bus_gaps_filled",
            "Messages that did not follow the last delivered id: the gap was read from the table",
            registry=r,
        )
        self.bus_resyncs = Counter(
            "pulse_bus_resyncs",
            "Times every tenant served was read again from the table, by reason",
            ["reason"],
            registry=r,
        )
        self.bus_fallbacks = Counter(
            "pulse_bus_fallbacks",
            "Times this process fell back to LISTEN because the bus was away",
            registry=r,
        )
        self.bus_connected = (
            Gauge(
                "pulse_bus_connected",
                "1 while the NATS connection is up (of every worker)",
                registry=r,
                multiprocess_mode="livemin",
            )
            if bus
            else None
        )
        self.bus_fallback = Gauge(
            "pulse_bus_fallback",
            "1 while delivery falls back to LISTEN (in any worker)",
            registry=r,
            multiprocess_mode="livemax",
        )
        # The cluster's single jobs: summed over all instances, each should be 1.
        self.bus_relay = Gauge(
            "pulse_bus_relay",
            "1 while this instance is the database's relay",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.status_sweeper = Gauge(
            "pulse_status_sweeper",
            "1 while this instance sweeps device statuses",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.rollups_keeper = Gauge(
            "pulse_rollups_keeper",
            "1 while this instance keeps the history rollups",
            registry=r,
            multiprocess_mode="livesum",
        )
        # Devices over MQTT (PULSE_MQTT_URL): pulse.mqtt.
        self.mqtt_messages = Counter(
            "pulse_mqtt_messages",
            "MQTT messages settled, by outcome (stored, duplicate, heartbeat, rejected, retained)",
            ["outcome"],
            registry=r,
        )
        self.mqtt_connected = (
            Gauge(
                "pulse_mqtt_connected",
                "1 while the MQTT connection is up (of every worker)",
                registry=r,
                multiprocess_mode="livemin",
            )
            if mqtt
            else None
        )
        self.mqtt_provisioning_failures = Counter(
            "pulse_mqtt_provisioning_failures",
            "Device credentials the broker could not be told of (fixed at the next connect)",
            registry=r,
        )
        self.open_files_exhausted = Counter(
            "pulse_open_files_exhausted",
            "Checks (one a second) that found no file descriptor left in this process: "
            "meanwhile new connections were closed unanswered (about the seconds spent so)",
            registry=r,
        )
        # Sampled: a count that only grows under steady load is a leak.
        self.asyncio_tasks = Gauge(
            "pulse_asyncio_tasks",
            "asyncio tasks in the serving processes, the scrape's own included",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.python_allocated_blocks = Gauge(
            "pulse_python_allocated_blocks",
            "Blocks the Python allocator holds for objects, garbage not yet collected included",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.python_full_collections = Gauge(
            "pulse_python_full_collections",
            "Full collections of Python's cyclic garbage collector since the process started",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.db_pool_connections = Gauge(
            "pulse_db_pool_connections",
            "Connections of the database pools, by state (idle, in_use)",
            ["state"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ingest_buffered_bytes = Gauge(
            "pulse_ingest_buffered_bytes",
            "Bytes of ingest request bodies held by requests not yet answered",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.history_exports = Gauge(
            "pulse_history_exports",
            "History exports streaming now (each holds a pooled connection)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.history_reads = Gauge(
            "pulse_history_reads",
            "History JSON answers being read or sent now (PULSE_MAX_HISTORY_READS)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ingest_rows = Counter(
            "pulse_ingest_rows", "Telemetry rows committed", ["endpoint"], registry=r
        )
        self.ingest_writes_remade = Counter(
            "pulse_ingest_writes_remade",
            "Ingest transactions rolled back and made again because the event ids they "
            "foresaw were taken (another process wrote the tenant, or a write ahead failed), "
            "or their tenant got its first alert rule since this process last wrote it",
            registry=r,
        )
        self.ingest_rejected = Counter(
            "pulse_ingest_rejected", "Ingest messages rejected", ["reason"], registry=r
        )
        self.ingest_failed = Counter(
            "pulse_ingest_failed",
            "Ingest requests answered with an error of the server instead of their "
            "messages' outcomes, by error (database_unavailable, server_busy, "
            "request_timeout, payload_too_large, internal_error)",
            ["error"],
            registry=r,
        )
        self.ingest_in_flight = Gauge(
            "pulse_ingest_in_flight",
            "Ingest writes waiting for their transaction (HTTP requests and MQTT bursts)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.ingest_oldest_in_flight = Gauge(
            "pulse_ingest_oldest_in_flight_seconds",
            "How long the oldest ingest write in flight has waited (0: none); seconds "
            "here while rows stop growing: ingest is stalled (a lock, the database)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ingest_latency = Histogram(
            "pulse_ingest_latency_seconds",
            "Ingest request latency, receipt to commit",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bus_read_failures = Counter(
            "pulse_bus_read_failures",
            "Reads of a tenant's new events from the table that failed (each is tried "
            "again, backing off to 5 s), by error: database_unavailable, or error (any "
            "other: a permission revoked, a bug)",
            ["error"],
            registry=r,
        )
        self.fetch_latency = Histogram(
            "pulse_listener_fetch_seconds",
            "Time to read notified rows from the table",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        # Every known label value of a labelled counter made at 0 now: a series that
        # appears at its first increment has no earlier value, and Prometheus's
        # increase() and rate() miss that first step (the first internal_error, the
        # first resync). Those of NATS and MQTT only where they are configured. The
        # stream kinds' are made by pulse.runtime (pulse.streams.limits.STREAM_KINDS).
        known: list[tuple[Counter, tuple[str, ...]]] = [
            (self.ingest_rows, INGEST_ENDPOINTS),
            (self.ingest_rejected, INGEST_REJECTIONS),
            (self.ingest_failed, INGEST_FAILURES),
            (self.bus_read_failures, ("database_unavailable", "error")),
        ]
        if bus:
            known += [
                (self.bus_resyncs, ("relay", "bus_back", "slow_consumer")),
                (self.bus_messages_relayed, BUS_MESSAGE_KINDS),
                (self.bus_publish_failures, BUS_MESSAGE_KINDS),
                (self.bus_messages_received, BUS_MESSAGE_KINDS),
            ]
        if mqtt:
            known += [(self.mqtt_messages, MQTT_OUTCOMES), (self.ingest_rows, ("mqtt",))]
        for counter, values in known:
            for value in values:
                counter.labels(value)

    def sample(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Set ``gauge`` to ``read()`` at every scrape (and refresh)."""
        self._samples.append((gauge, read))

    def refresh(self) -> None:
        for gauge, read in self._samples:
            gauge.set(read())

    async def keep_fresh(self) -> None:
        """Under several workers: the sampled gauges of a worker no scrape reaches."""
        while True:
            self.refresh()
            await asyncio.sleep(REFRESH_S)

    def exposition(self) -> bytes:
        """The text format: of this process, or of every worker sharing its folder."""
        self.refresh()
        if self.shared_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.shared_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
