"""MQTT in a process: the connection, the intake it feeds, the provisioner it serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from datetime import UTC, datetime, timedelta

from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.queries import load_queries
from pulse.ingest.service import Ingest
from pulse.logs import Throttled
from pulse.mqtt import topics
from pulse.mqtt.intake import MqttIntake
from pulse.mqtt.link import SESSION_EXPIRY_S, BrokerUnavailable, BrokerUrl, MqttLink
from pulse.mqtt.provision import Provisioner, ProvisioningFailed
from pulse.ops.metrics import Metrics

log = logging.getLogger(__name__)
Q = load_queries(__package__)
TRIM_INTERVAL_S = 600
TRIM_BATCH = 5000
# Any constant the processes of a cluster share (advisory locks are per database).
MEMBERS_LOCK_KEY = 0x70756C73_65_6D71  # "pulse" "mq"
# A process that stops asks the database this long at most whether another stays.
MEMBERS_TIMEOUT_S = 3.0
JOIN_RETRY_MAX_S = 5.0


async def trim_claims(db: Database, cutoff: datetime, batch: int = TRIM_BATCH) -> int:
    """Delete the seq claims made before ``cutoff``; how many."""
    deleted = 0
    while True:
        status = await db.execute(Q["trim_broker_seqs"], cutoff, batch)
        count = int(status.split()[-1])
        deleted += count
        if count < batch:
            return deleted


class Mqtt:
    def __init__(
        self,
        url: str,
        client_id: str | None,
        db: Database,
        ingest: Ingest,
        metrics: Metrics,
        *,
        process_id: uuid.UUID,
        ca_file: str | None = None,
    ) -> None:
        self.intake = MqttIntake(ingest, metrics)
        self.link = MqttLink(
            BrokerUrl.parse(url, ca_file),
            client_id or topics.default_client_id(),
            topics.subscriptions(),
            on_delivery=self.intake.on_delivery,
            on_connected=self._connected,
        )
        self.intake.attach(self.link)
        self.provisioner = Provisioner(self.link, db, metrics)
        self._db = db
        # This process's lease (pulse.streams.limits): while it is valid, and its
        # membership row says it is not leaving, others may leave the group.
        self._process_id = process_id
        assert metrics.mqtt_connected is not None, "made where MQTT is configured"
        metrics.sample(metrics.mqtt_connected, lambda: float(self.link.connected))
        self._reconciling: asyncio.Task[None] | None = None

    async def run(self) -> None:
        """The connection, for as long as the process runs (a supervised side task), and
        the trimming of old seq claims."""
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.link.run())
                tasks.create_task(self._trim_claims())
                tasks.create_task(self._join())
                try:
                    await asyncio.Event().wait()  # until the process stops
                except asyncio.CancelledError:
                    # Before the connection is cancelled: settle what was taken, and leave
                    # the shared group if another process stays in it, so that nothing
                    # waits for this one; the last one keeps its session, where what
                    # devices publish waits for it (with no subscriber the broker drops it).
                    end_session = await self._others_stay()
                    await self.link.leave(self.intake.idle, end_session=end_session)
                    raise
        finally:
            if self._reconciling is not None:
                self._reconciling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reconciling
            await self.intake.stop()

    async def _trim_claims(self) -> None:
        """A claim (migrations/0008_broker_seqs.sql) is kept while a redelivery can come:
        the session's expiry and an hour; so a device's seq must not repeat within that."""
        while True:
            cutoff = datetime.now(UTC) - timedelta(seconds=SESSION_EXPIRY_S + 3600)
            try:
                await trim_claims(self._db, cutoff)
            except DatabaseUnavailable as exc:
                log.warning("MQTT: old seq claims could not be trimmed: %s", exc)
            await asyncio.sleep(TRIM_INTERVAL_S)

    async def _join(self) -> None:
        """Once subscribed, count as a member of the shared group
        (migrations/0020_mqtt_members.sql): the others may then leave it. Until then,
        or if it fails, the others keep their sessions when they stop (the safe side)."""
        await self.link.subscribed.wait()
        unavailable = Throttled(log)
        delay = 0.1
        while True:
            try:
                await self._db.execute(Q["join_members"], self.link.client_id, self._process_id)
                return
            except DatabaseUnavailable as exc:
                unavailable.warning("MQTT: cannot record this process's subscription: %s", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, JOIN_RETRY_MAX_S)

    async def _others_stay(self) -> bool:
        """Whether another process stays in the shared group, not leaving, its lease valid:
        then this one is marked leaving, and may end its session. One at a time under a
        lock, so that of processes stopping together (a ``--workers`` instance) the last
        one keeps its session. If the database cannot say, the session is kept."""
        if not self.link.connected:
            return False  # nothing to leave: the session stays as it is
        try:
            async with asyncio.timeout(MEMBERS_TIMEOUT_S), self._db.transaction() as conn:
                await conn.execute(Q["lock_members"], MEMBERS_LOCK_KEY)
                return bool(
                    await conn.fetchval(Q["may_leave"], self.link.client_id, self._process_id)
                )
        except (DatabaseUnavailable, TimeoutError) as exc:
            log.warning(
                "MQTT: cannot tell whether another Pulse process stays subscribed (%s): "
                "session %s is kept, and what devices publish waits for it",
                str(exc) or "no answer in time",
                self.link.client_id,
            )
            return False

    def _connected(self) -> None:
        if self._reconciling is None or self._reconciling.done():
            self._reconciling = asyncio.create_task(self._reconcile(), name="pulse:mqtt-reconcile")

    async def _reconcile(self) -> None:
        try:
            if await self.provisioner.reconcile():
                self.link.synced = self.link.connected
            else:
                log.info("MQTT: Pulse's broker client has its role; the broker reconnects it")
        except (BrokerUnavailable, ProvisioningFailed) as exc:
            log.warning("MQTT: the broker's device clients could not be checked: %s", exc)
        except Exception:
            log.exception("MQTT: the broker's device clients could not be checked")
