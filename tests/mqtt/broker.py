"""A Mosquitto of a test's own (dynamic security, persistence) and MQTT devices for tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pulse.sim.broker import MISSING, Mosquitto, mosquitto_binaries
from pulse.sim.mqtt_device import MqttDevice

MOSQUITTO_MISSING = MISSING

__all__ = ["MOSQUITTO_MISSING", "Device", "Mosquitto", "closing", "mosquitto_binaries"]


class Device(MqttDevice):
    """A device of the test's broker."""

    def __init__(
        self, broker: Mosquitto, username: str, password: str, *, client_id: str | None = None
    ) -> None:
        super().__init__(broker.port, username, password, client_id=client_id)


@contextlib.contextmanager
def closing(*devices: Device) -> Iterator[None]:
    try:
        yield
    finally:
        for device in devices:
            with contextlib.suppress(Exception):
                device.close()
