"""MQTT in a process: the connection, the intake it feeds, the provisioner it serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from pulse.db.database import Database
from pulse.ingest.service import Ingest
from pulse.mqtt import topics
from pulse.mqtt.intake import MqttIntake
from pulse.mqtt.link import BrokerUnavailable, BrokerUrl, MqttLink
from pulse.mqtt.provision import Provisioner, ProvisioningFailed
from pulse.ops.metrics import Metrics

log = logging.getLogger(__name__)


def default_client_id() -> str:
    """Stable across restarts of the process on this host (its session comes back)."""
    return f"pulse-{socket.gethostname()}"


class Mqtt:
    def __init__(
        self, url: str, client_id: str | None, db: Database, ingest: Ingest, metrics: Metrics
    ) -> None:
        self.intake = MqttIntake(ingest, metrics)
        self.link = MqttLink(
            BrokerUrl.parse(url),
            client_id or default_client_id(),
            topics.subscriptions(),
            on_delivery=self.intake.on_delivery,
            on_connected=self._connected,
        )
        self.intake.attach(self.link)
        self.provisioner = Provisioner(self.link, db, metrics)
        metrics.mqtt_connected.set_function(lambda: float(self.link.connected))
        self._reconciling: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """The connection, for as long as the process runs (a supervised side task)."""
        try:
            await self.link.run()
        finally:
            if self._reconciling is not None:
                self._reconciling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reconciling
            await self.intake.stop()

    def _connected(self) -> None:
        if self._reconciling is None or self._reconciling.done():
            self._reconciling = asyncio.create_task(self._reconcile(), name="pulse:mqtt-reconcile")

    async def _reconcile(self) -> None:
        try:
            await self.provisioner.reconcile()
            self.link.synced = self.link.connected
        except (BrokerUnavailable, ProvisioningFailed) as exc:
            log.warning("MQTT: the broker's device clients could not be checked: %s", exc)
        except Exception:
            log.exception("MQTT: the broker's device clients could not be checked")
