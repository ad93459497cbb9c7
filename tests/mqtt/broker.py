"""A Mosquitto of a test's own (dynamic security, persistence) and MQTT devices for tests."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import secrets
import shutil
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.support import free_port

DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
MOSQUITTO_MISSING = (
    "mosquitto is not installed: apt-get install mosquitto (the Debian package .ci/run "
    "installs; it ships the dynamic-security plugin), or put it on the PATH"
)


def mosquitto_binaries() -> tuple[str, str, str] | None:
    """(mosquitto, mosquitto_ctrl, the dynamic-security plugin), or None when missing."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    broker = shutil.which("mosquitto", path=path)
    ctrl = shutil.which("mosquitto_ctrl", path=path)
    candidates = [Path(DYNSEC_PLUGIN), *Path("/usr/lib").glob("*/mosquitto_dynamic_security.so")]
    plugin = next((str(p) for p in candidates if p.exists()), None)
    if broker is None or ctrl is None or plugin is None:
        return None
    return broker, ctrl, plugin


class Mosquitto:
    """On a free loopback port, with a dynamic-security admin, which a test may stop, kill
    and start again (same port, same persisted sessions)."""

    ADMIN = "pulse-admin"

    def __init__(self, directory: Path) -> None:
        found = mosquitto_binaries()
        assert found is not None, MOSQUITTO_MISSING
        self.binary, self.ctrl, self.plugin = found
        self.directory = directory
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.ADMIN}:{self.password}@127.0.0.1:{self.port}"

    async def start(self, timeout: float = 10) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        dynsec = self.directory / "dynamic-security.json"
        if not dynsec.exists():
            init = await asyncio.create_subprocess_exec(
                self.ctrl, "dynsec", "init", str(dynsec), self.ADMIN, self.password,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            assert await init.wait() == 0, "mosquitto_ctrl dynsec init failed"
        config = self.directory / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # Run as root, mosquitto would become the user "mosquitto", who cannot read
            # the test's private folder.
            f"user {getpass.getuser()}\n"
            "allow_anonymous false\n"
            f"plugin {self.plugin}\n"
            f"plugin_opt_config_file {dynsec}\n"
            "persistence true\n"
            f"persistence_location {self.directory}/\n"
            "max_queued_messages 100000\n"
        )
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "-c", str(config),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(timeout):
            while True:
                assert self.proc.returncode is None, "mosquitto exited at start"
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                writer.close()
                return

    async def stop(self) -> None:
        """SIGTERM: mosquitto saves its sessions and queued messages, then exits."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        self.proc = None


class Device:
    """An MQTT 5 device client (paho in its own thread, as firmware or a gateway would run
    it): a persistent session, QoS 1, reconnecting by itself."""

    def __init__(self, broker: Mosquitto, username: str, password: str) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"device-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(0.05, 0.5)
        # No limit: paho 2.2 leaves messages it had to queue behind its inflight limit
        # unsent after a reconnect.
        self.client.max_inflight_messages_set(0)
        self.broker = broker
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
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", self.broker.port, clean_start=False, properties=properties)
        self.client.loop_start()
        reason = await asyncio.wait_for(asyncio.wrap_future(self._connack), 10)
        if reason.is_failure:
            self.client.loop_stop()
        return reason

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish_nowait(self, topic: str, payload: bytes) -> Future[ReasonCode]:
        """QoS 1; the future holds the PUBACK's reason (not authorised, for another's topic)."""
        # Not under the lock: paho calls on_publish holding a lock of its own.
        info = self.client.publish(topic, payload, qos=1)
        with self._lock:
            return self._acks.setdefault(info.mid, Future())

    async def publish(self, topic: str, payload: bytes) -> ReasonCode:
        return await asyncio.wait_for(asyncio.wrap_future(self.publish_nowait(topic, payload)), 10)

    async def subscribe(self, topic: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic, qos=1)
        with self._lock:
            future = self._subacks.setdefault(mid, Future())
        return await asyncio.wait_for(asyncio.wrap_future(future), 10)

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if not self._connack.done():
            self._connack.set_result(reason)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: ReasonCode, _p: Any) -> None:
        with self._lock:
            future = self._acks.setdefault(mid, Future())
        if not future.done():
            future.set_result(reason)

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        with self._lock:
            future = self._subacks.setdefault(mid, Future())
        if not future.done():
            future.set_result(reasons)

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        self.received.append((message.topic, bytes(message.payload)))


@contextlib.contextmanager
def closing(*devices: Device) -> Iterator[None]:
    try:
        yield
    finally:
        for device in devices:
            with contextlib.suppress(Exception):
                device.close()
