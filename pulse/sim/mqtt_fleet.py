"""The simulated devices that publish over MQTT: one broker connection each."""

from __future__ import annotations

import orjson

from pulse.mqtt import topics
from pulse.sim.mqtt_device import MqttDevice


class MqttFleet:
    """``Simulator``'s MQTT sender, on the broker at ``host``:``port``."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._devices: dict[tuple[str, str], MqttDevice] = {}

    async def connect(self, tenant_id: str, device_id: str, token: str) -> bool:
        """Connect the device with its token as password; False when the broker refuses it."""
        self._disconnect((tenant_id, device_id))
        device = MqttDevice(
            self.port,
            topics.username(tenant_id, device_id),
            token,
            self.host,
            client_id=topics.client_id(tenant_id, device_id),
        )
        if (await device.connect()).is_failure:
            return False
        self._devices[(tenant_id, device_id)] = device
        return True

    def send(self, tenant_id: str, device_id: str, reading: dict[str, object]) -> None:
        """Publish a reading (QoS 1); the device's paho thread sends it, and again after a
        reconnect if the broker did not take it."""
        topic = topics.device_topic(tenant_id, device_id, topics.TELEMETRY)
        self._devices[(tenant_id, device_id)].publish_nowait(topic, orjson.dumps(reading))

    def close(self) -> None:
        for device in list(self._devices):
            self._disconnect(device)

    def _disconnect(self, device: tuple[str, str]) -> None:
        connected = self._devices.pop(device, None)
        if connected is not None:
            connected.close()
