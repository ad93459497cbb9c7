"""A write that fails for a reason not known to pass: only the message that cannot be
written on its own is refused; the others of its burst are stored. The intake is driven
directly (one burst, exactly as given) against a real database; the broker's side is a
record of what was acknowledged and answered."""

from __future__ import annotations

import json

import asyncpg

from pulse.ingest.service import Ingest
from pulse.ingest.writer import TelemetryWriter
from pulse.mqtt.intake import MqttIntake
from pulse.mqtt.link import Delivery
from pulse.ops.metrics import Metrics
from tests.mqtt.support import rows
from tests.support import provision_device, seam, until

POISON = """
CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.metrics ? 'poison' THEN
        RAISE EXCEPTION 'this reading cannot be stored';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER poison BEFORE INSERT ON telemetry FOR EACH ROW EXECUTE FUNCTION poison();
"""


class Broker:
    """The link's side of the intake: what it acknowledged and what it answered."""

    def __init__(self) -> None:
        self.settled: list[Delivery] = []
        self.published: list[tuple[str, bytes]] = []

    def stale(self, delivery: Delivery) -> bool:
        return False

    def settle(self, delivery: Delivery) -> None:
        self.settled.append(delivery)

    def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.published.append((topic, payload))


def delivery(mid: int, device_id: str, metrics: dict[str, float], seq: int) -> Delivery:
    body = json.dumps({"metrics": metrics, "seq": seq}).encode()
    return Delivery(f"pulse/t1/{device_id}/telemetry", body, 1, mid, 1)


async def test_only_the_message_that_fails_alone_is_refused(pool: asyncpg.Pool) -> None:
    await provision_device(pool, "t1", "dev-1")
    await provision_device(pool, "t1", "dev-2")
    await pool.execute(POISON)
    metrics, intake, broker = attached(pool)
    burst = [
        delivery(1, "dev-1", {"n": 1}, 1),
        delivery(2, "dev-2", {"poison": 1}, 1),
        delivery(3, "dev-1", {"n": 2}, 2),
        delivery(4, "dev-2", {"n": 3}, 2),
    ]
    for message in burst:  # in one turn of the loop: one burst, one write
        intake.on_delivery(message)
    try:
        await until(lambda: len(broker.settled) == len(burst), 20)
    finally:
        await intake.stop()
    assert broker.settled == burst
    assert [(r["device_id"], r["seq"]) for r in await rows(pool)] == [
        ("dev-1", 1),
        ("dev-1", 2),
        ("dev-2", 2),
    ]
    ((topic, body),) = broker.published
    assert topic == "pulse/t1/dev-2/errors"
    assert {k: v for k, v in json.loads(body).items() if k != "detail"} == {
        "error": "internal_error",
        "seq": 1,
    }
    assert refused(metrics) == 1


def refused(metrics: Metrics) -> float | None:
    """pulse_ingest_rejected_total{reason="internal_error"}, which counts MQTT readings too."""
    return metrics.registry.get_sample_value(  # type: ignore[no-any-return]
        "pulse_ingest_rejected_total", {"reason": "internal_error"}
    )


async def test_a_message_written_alone_that_fails_is_refused_and_counted(
    pool: asyncpg.Pool,
) -> None:
    await provision_device(pool, "t1", "dev-2")
    await pool.execute(POISON)
    metrics, intake, broker = attached(pool)
    message = delivery(1, "dev-2", {"poison": 1}, 1)
    intake.on_delivery(message)
    try:
        await until(lambda: bool(broker.settled), 20)
    finally:
        await intake.stop()
    assert broker.settled == [message]
    assert json.loads(broker.published[0][1])["error"] == "internal_error"
    assert refused(metrics) == 1


def attached(pool: asyncpg.Pool) -> tuple[Metrics, MqttIntake, Broker]:
    """An intake writing to ``pool``, attached to a stand-in broker."""
    metrics = Metrics()
    intake = MqttIntake(Ingest(TelemetryWriter(seam(pool)), metrics), metrics)
    broker = Broker()
    intake.attach(broker)  # type: ignore[arg-type]
    return metrics, intake, broker
