"""A simulated device over MQTT 5 (paho in a thread of its own, as firmware or a gateway
would run it): a persistent session, QoS 1, reconnecting by itself. `pulse demo` sends
part of its fleet with it; the tests use it as their device."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import Any, TypeVar

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

T = TypeVar("T")


class MqttDevice:
    """One device's connection to the broker on ``port`` of ``host``, under the client id
    the broker requires of a device: its username, ``<tenant_id>/<device_id>``
    (``client_id`` is another, for a test of the broker refusing it)."""

    def __init__(
        self,
        port: int,
        username: str,
        password: str,
        host: str = "127.0.0.1",
        *,
        client_id: str | None = None,
    ) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=username if client_id is None else client_id,
            protocol=paho.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(1, 2)
        # No limit: paho 2.2 leaves messages it had to queue behind its inflight limit
        # unsent after a reconnect.
        self.client.max_inflight_messages_set(0)
        self.host, self.port = host, port
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._connack: Future[ReasonCode] = Future()
        self._acks: dict[int, Future[ReasonCode]] = {}
        self._subacks: dict[int, Future[list[ReasonCode]]] = {}
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    async def connect(self) -> ReasonCode:
        """Connect; the CONNACK's reason (a failure when the credentials are refused)."""
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        self.client.connect(self.host, self.port, clean_start=False, properties=properties)
        self.client.loop_start()
        reason = await asyncio.wait_for(asyncio.wrap_future(self._connack), 10)
        if reason.is_failure:
            self.client.loop_stop()
        return reason

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish_nowait(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> Future[ReasonCode]:
        """QoS 1; the future holds the PUBACK's reason (not authorised, for another's topic)."""
        # Not under the lock: paho calls on_publish holding a lock of its own.
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._meet(self._acks, info.mid)

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode:
        future = self.publish_nowait(topic, payload, retain=retain)
        return await asyncio.wait_for(asyncio.wrap_future(future), 10)

    async def subscribe(self, topic: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None, "not connected"
        future = self._meet(self._subacks, mid)
        return await asyncio.wait_for(asyncio.wrap_future(future), 10)

    def _meet(self, table: dict[int, Future[T]], mid: int) -> Future[T]:
        """The future of message ``mid``: made by whichever of the caller and paho's
        callback comes first, taken out by the other (mids are reused)."""
        with self._lock:
            future = table.pop(mid, None)
            if future is None:
                future = table[mid] = Future()
            return future

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if not self._connack.done():
            self._connack.set_result(reason)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        future = self._meet(self._acks, mid)
        if not future.done():
            future.set_result(reason)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        future = self._meet(self._subacks, mid)
        if not future.done():
            future.set_result(reasons)

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        self.received.append((message.topic, bytes(message.payload)))
