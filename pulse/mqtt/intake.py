"""MQTT messages -> ``pulse.ingest`` items -> the writer; acknowledged once settled.

A reading on ``pulse/<tenant_id>/<device_id>/telemetry`` takes the same path as
one posted over HTTP (``pulse.ingest.intake``, then ``Ingest``: rate limits,
group commit, the alert rules' hook), and is acknowledged to the broker only
once its transaction has committed. One write is in flight at a time, with every
message that arrived since the one before began: a device's readings commit in
the order the broker delivered them. What can never be stored (bad JSON, an unknown device, too many
metrics, over the rate) is acknowledged too, so the broker does not deliver it
forever, counted, and answered on the device's errors topic with the body HTTP
would have answered. So is a retained message the broker replays to a new
subscription (at every restart of a process, and to every process that joins): it
was taken when it was published, or was never meant as a reading. A write that
fails because the database cannot serve it (it is away, it cancelled the
statement, a deadlock) is tried again until it commits or the connection it came
on ends (the broker then delivers it again); one that fails otherwise is tried a
few times, then message by message, so that only a message that cannot be written
on its own is refused (``internal_error``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from pulse.db.errors import passes
from pulse.errors import INTERNAL_ERROR, INVALID_PAYLOAD, PAYLOAD_TOO_LARGE, error_body
from pulse.ingest import intake
from pulse.ingest.model import Accepted, Outcome, Rejected
from pulse.ingest.service import Ingest, Receipt
from pulse.ingest.validation import InvalidPayload, decode_json, parse_seq
from pulse.logs import Throttled
from pulse.mqtt import topics
from pulse.mqtt.link import Delivery, MqttLink
from pulse.ops.metrics import Metrics

log = logging.getLogger(__name__)

ENDPOINT = "mqtt"
MAX_PAYLOAD = 1024 * 1024  # as an HTTP body
RETRY_MAX_S = 5.0
# Tries of a write that fails for a reason not known to pass, before its messages are
# written one by one (a burst), or it is refused internal_error (one message).
ATTEMPTS = 3


class MqttIntake:
    def __init__(self, ingest: Ingest, metrics: Metrics) -> None:
        self._ingest = ingest
        self._metrics = metrics
        self._link: MqttLink | None = None
        self._arrived: list[Delivery] = []
        self._writing: asyncio.Task[None] | None = None
        # A line per 10 s of an outage (docs/operations.md), not one per try.
        self._waiting = Throttled(log)
        self._failing = Throttled(log)

    def attach(self, link: MqttLink) -> None:
        self._link = link

    def on_delivery(self, delivery: Delivery) -> None:
        """Called by the link for each message: the messages of one read go out together."""
        self._arrived.append(delivery)
        if self._writing is None or self._writing.done():
            # Its first step runs once this read's messages have all arrived.
            self._writing = asyncio.get_running_loop().create_task(self._write_arrived())

    async def idle(self) -> None:
        """Until every message that arrived is written and settled."""
        while self._writing is not None and not self._writing.done():
            await asyncio.wait({self._writing})

    async def stop(self) -> None:
        """Let the write in flight go (unacknowledged: the broker delivers it again)."""
        if self._writing is not None:
            self._writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writing

    async def _write_arrived(self) -> None:
        """One write at a time, of everything that arrived since the last one began: a
        device's readings commit in the order they came (a write does not overtake the
        one before it, nor does a retried one fall behind the next), and under load the
        writes grow instead of queueing up."""
        while self._arrived:
            deliveries, self._arrived = self._arrived, []
            await self._write(deliveries)

    async def _write(self, deliveries: list[Delivery]) -> None:
        receipt = Receipt(ENDPOINT)
        items = [self._item(delivery, receipt) for delivery in deliveries]
        outcomes = await self._outcomes(deliveries, items, receipt)
        if outcomes is None:
            return  # the broker delivers them again, on the next connection
        for delivery, item, outcome in zip(deliveries, items, outcomes, strict=True):
            self._settle(delivery, item, outcome)

    async def _outcomes(
        self, deliveries: list[Delivery], items: list[intake.Item], receipt: Receipt
    ) -> list[Outcome] | None:
        """The burst's outcomes; None once its connection has ended.

        A write that keeps failing for a reason not known to pass is tried again
        message by message: the messages of other devices (or other readings of the
        same one) are stored, and only one that fails on its own is refused."""
        try:
            return await self._written(deliveries, items, receipt)
        except _Failed:
            if len(deliveries) == 1:
                return [self._refused()]
        outcomes: list[Outcome] = []
        for delivery, item in zip(deliveries, items, strict=True):
            try:
                alone = await self._written([delivery], [item], receipt)
            except _Failed:
                alone = [self._refused()]
            if alone is None:
                return None
            outcomes += alone
        return outcomes

    def _refused(self) -> Rejected:
        """Refused here, where Ingest never answered: counted as Ingest counts the
        refusals it answers (pulse_ingest_rejected_total, by reason)."""
        self._metrics.ingest_rejected.labels(_REFUSED.reason.code).inc()
        return _REFUSED

    async def _written(
        self, deliveries: list[Delivery], items: list[intake.Item], receipt: Receipt
    ) -> list[Outcome] | None:
        """Write until it commits, while the database cannot serve it (unavailable, a
        statement cancelled, a deadlock: ``pulse.db.errors.passes``); None once the
        connection the messages came on has ended. A failure of any other kind is
        tried again ATTEMPTS times in all, then raised as ``_Failed``."""
        assert self._link is not None
        delay = 0.1
        failures = 0
        while True:
            try:
                return await self._ingest(items, receipt)
            except Exception as exc:
                if passes(exc):
                    self._waiting.warning("MQTT readings wait for the database: %s", exc)
                else:
                    failures += 1
                    if failures >= ATTEMPTS:
                        # Never stored, and never to be: answered and acknowledged, so
                        # that it cannot come back forever nor hold up the others' acks.
                        log.exception("%d MQTT messages could not be written", len(items))
                        raise _Failed from exc
                    self._failing.warning("MQTT messages could not be written (%s); again", exc)
            if all(self._link.stale(d) for d in deliveries):
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def _item(self, delivery: Delivery, receipt: Receipt) -> intake.Item:
        topic = topics.parse(delivery.topic)
        if topic is None or topic.kind not in topics.INTAKE_KINDS:
            return Rejected(INVALID_PAYLOAD, f"Pulse does not read the topic {delivery.topic!r}.")
        if delivery.retain:
            return _RETAINED
        if topic.kind == topics.HEARTBEAT:
            return intake.broker_heartbeat(topic.tenant_id, topic.device_id)
        if len(delivery.payload) > MAX_PAYLOAD:
            return Rejected(PAYLOAD_TOO_LARGE, PAYLOAD_TOO_LARGE.meaning)
        return intake.broker_reading(topic.tenant_id, topic.device_id, delivery.payload, receipt.at)

    def _settle(self, delivery: Delivery, item: intake.Item, outcome: Outcome) -> None:
        assert self._link is not None
        messages = self._metrics.mqtt_messages
        if isinstance(outcome, Rejected):
            messages.labels("retained" if delivery.retain else "rejected").inc()
            topic = topics.parse(delivery.topic)
            if topic is not None:
                # A rate_limited detail says the wait already ("retry in N s."); the
                # reading's seq, when it has one, says which reading to publish again.
                if isinstance(item, Rejected):
                    seq_of = _seq_in(delivery.payload)
                else:
                    seq_of = None if item.reading is None else item.reading.seq
                seq = {} if seq_of is None else {"seq": seq_of}
                self._link.publish(
                    topics.device_topic(topic.tenant_id, topic.device_id, topics.ERRORS),
                    error_body(outcome.reason, outcome.detail, **seq),
                )
        elif isinstance(outcome, Accepted):
            if outcome.duplicate:
                messages.labels("duplicate").inc()
            elif outcome.event_id is None:
                messages.labels("heartbeat").inc()
            else:
                messages.labels("stored").inc()
        self._link.settle(delivery)


class _Failed(Exception):
    """A write failed ATTEMPTS times, for a reason not known to pass."""


_REFUSED = Rejected(INTERNAL_ERROR, "The reading could not be stored; it will not be tried again.")
_RETAINED = Rejected(
    INVALID_PAYLOAD,
    "Retained messages are not taken: the broker replays them to every new subscription, "
    "so one reading would be stored again and again. Publish readings without the retain "
    "flag, and clear this topic's retained message (an empty retained payload).",
)


def _seq_in(payload: bytes) -> int | None:
    """The seq of a reading refused before it was read (bad metrics, an unknown field):
    the device still learns which of its readings it was, when the JSON says. A payload
    over MAX_PAYLOAD is never parsed: megabytes of JSON would hold up the event loop
    (three of 80 MB held /healthz up 5 s), so its answer has no seq."""
    if len(payload) > MAX_PAYLOAD:
        return None
    try:
        body = decode_json(payload)  # as ingest reads it: a value beyond a double too
        return parse_seq(body.get("seq")) if isinstance(body, dict) else None
    except InvalidPayload:
        return None
