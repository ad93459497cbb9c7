"""The broker's device credentials, kept in step with the devices (dynamic security).

A device created gets a broker client (its username ``<tenant_id>/<device_id>``,
its password its provision token) in a role of its own; a rotation sets the new
password before Pulse stores the new token (a broker that cannot be told
refuses the rotation: the old token must not keep working over MQTT); a device
deleted loses both. Pulse keeps only token hashes, so a device that existed
before MQTT was enabled, or was created while the broker was away, gets its
client and role without a password at the next connection (``reconcile``):
it can connect once its token is rotated. A device created or deleted while the
broker was away is marked (``broker_unsynced``): its client, which may carry an
older device's token under the same name, is reset at the next connection.
Every device's client has a fixed client id, its username (``dynsec.create_client``);
a client Pulse made before that gets it at the next connection (``reconcile``).
A broker client named like a device that Pulse did not make (not in the device's
role) is an operator's own: Pulse never sets its password nor deletes it, so a
tenant admin cannot take it over by naming a device after it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pulse.db.database import Database
from pulse.db.errors import DatabaseUnavailable
from pulse.db.queries import load_queries
from pulse.errors import BROKER_UNAVAILABLE, ApiError
from pulse.mqtt import dynsec, topics
from pulse.mqtt.link import BrokerUnavailable, MqttLink
from pulse.ops.metrics import Metrics

log = logging.getLogger(__name__)
Q = load_queries(__package__)
# Broker clients listed per dynamic-security command (a few hundred bytes each, verbose).
LIST_PAGE = 1000


class ProvisioningFailed(Exception):
    """The broker refused a dynamic-security command."""


class Provisioner:
    """``pulse.fleet.devices.Credentials`` on the broker."""

    def __init__(self, link: MqttLink, db: Database, metrics: Metrics) -> None:
        self._link = link
        self._db = db
        self._metrics = metrics

    async def created(self, tenant_id: str, device_id: str, token: str) -> None:
        try:
            await self._ensure(tenant_id, device_id, token)
        except (BrokerUnavailable, ProvisioningFailed) as exc:
            self._failed("create", tenant_id, device_id, exc)
            await self._mark(tenant_id, device_id)

    async def rotating(self, tenant_id: str, device_id: str, token: str) -> None:
        try:
            await self._ensure(tenant_id, device_id, token)
        except (BrokerUnavailable, ProvisioningFailed) as exc:
            self._failed("rotate", tenant_id, device_id, exc)
            raise ApiError(BROKER_UNAVAILABLE, None, {"Retry-After": "2"}) from None

    async def deleted(self, tenant_id: str, device_id: str) -> None:
        try:
            await self._delete(tenant_id, device_id)
        except (BrokerUnavailable, ProvisioningFailed) as exc:
            self._failed("delete", tenant_id, device_id, exc)
            await self._mark(tenant_id, device_id)

    async def reconcile(self) -> bool:
        """Pulse's own role, then a client for every device and none for a device that is
        gone (a client Pulse made: other broker clients are the operator's): after MQTT
        is first enabled, and after any time the broker was away.
        False when it stopped at giving Pulse its role (the first time): the broker then
        closes the connection, and the next one goes on from here."""
        (admin,) = await self._link.control([dynsec.get_client(self._link.username)])
        _check(admin)
        if not dynsec.has_role(admin, dynsec.SERVICE_ROLE):
            self._link.expecting_kick = True
            try:
                for response in await self._link.control(dynsec.service_role(self._link.username)):
                    _check(response, tolerate=dynsec.exists)
            except BrokerUnavailable:
                if self._link.connected:
                    raise
                # Closed by the broker before its answer came, as it gave the role.
            return False
        on_broker: set[tuple[str, str]] = set()
        unbound: set[tuple[str, str]] = set()  # Pulse's, without the device's client id
        for client in await self._clients():
            device = topics.parse_username(str(client.get("username")))
            if device is None:
                continue
            on_broker.add(device)
            ours = dynsec.in_role(client, topics.role(*device))
            if ours and client.get("clientid") != topics.client_id(*device):
                unbound.add(device)
        devices = {
            (row["tenant_id"], row["device_id"]) for row in await self._db.fetch(Q["all_devices"])
        }
        # First, as the rest may fail: clients made before each device had a fixed
        # client id. Until it has one, a device can connect under Pulse's client id (or
        # another device's) and take over its session. Only Pulse's own (in the
        # device's role): an operator's client named <a>/<b> is left as the operator
        # made it. (That of a device that is gone too: its deletion below may fail.)
        fixed = 0
        for tenant_id, device_id in sorted(unbound):
            (response,) = await self._link.control([dynsec.set_client_id(tenant_id, device_id)])
            _check(response, tolerate=dynsec.missing)
            fixed += dynsec.error(response) is None
        if fixed:
            log.warning(
                "MQTT: %d device broker clients now accept only the client id "
                "<tenant_id>/<device_id>; a device that connects with another is refused "
                "(CONNACK 135, not authorized)",
                fixed,
            )
        for tenant_id, device_id in sorted(devices - on_broker):
            await self._ensure(tenant_id, device_id, None)
        for tenant_id, device_id in sorted(on_broker - devices):
            if await self._made_here(tenant_id, device_id):
                await self._delete(tenant_id, device_id)
        # A client named like a device may be an older device's, with its token: reset.
        for row in await self._db.fetch(Q["broker_unsynced"]):
            tenant_id, device_id = row["tenant_id"], row["device_id"]
            await self._delete(tenant_id, device_id)
            if (tenant_id, device_id) in devices:
                try:
                    await self._ensure(tenant_id, device_id, None)
                except ProvisioningFailed as exc:
                    self._failed("create", tenant_id, device_id, exc)
            await self._db.execute(
                Q["clear_broker_unsynced"], tenant_id, device_id, row["marked_at"]
            )
        if devices - on_broker:
            log.info(
                "MQTT: %d devices given broker clients without a password; each can connect "
                "once its token is rotated",
                len(devices - on_broker),
            )
        return True

    async def _clients(self) -> list[dict[str, Any]]:
        """Every broker client, with its client id and roles, a page at a time (a page
        stays far under the largest packet Pulse takes, link.MAX_PACKET_SIZE)."""
        clients: list[dict[str, Any]] = []
        while True:
            (page,) = await self._link.control([dynsec.list_clients(len(clients), LIST_PAGE)])
            _check(page)
            listed = dynsec.listed_clients(page)
            clients.extend(listed)
            if len(listed) < LIST_PAGE:
                return clients

    async def _ensure(self, tenant_id: str, device_id: str, password: str | None) -> None:
        """The device's role and client exist, with ``password`` when one is given."""
        role, client = await self._link.control(
            [
                dynsec.device_role(tenant_id, device_id),
                dynsec.create_client(tenant_id, device_id, password),
            ]
        )
        _check(role, tolerate=dynsec.exists)
        if dynsec.exists(client):
            if not await self._made_here(tenant_id, device_id):
                # An operator's own client of that name: its password is not ours to set
                # (a tenant admin naming a device after it would take it over).
                raise ProvisioningFailed(
                    f"the broker client {topics.username(tenant_id, device_id)} is not one "
                    "Pulse made (an operator's own): left alone, so the device cannot "
                    "connect over MQTT; rename one of them"
                )
            if password is not None:
                (changed,) = await self._link.control(
                    [dynsec.set_password(tenant_id, device_id, password)]
                )
                _check(changed)
        else:
            _check(client)

    async def _made_here(self, tenant_id: str, device_id: str) -> bool:
        """Whether the broker client named like a device is one Pulse made (in the
        device's own role), not an operator's own ``<a>/<b>`` client."""
        (client,) = await self._link.control(
            [dynsec.get_client(topics.username(tenant_id, device_id))]
        )
        return dynsec.has_role(client, topics.role(tenant_id, device_id))

    async def _delete(self, tenant_id: str, device_id: str) -> None:
        (client,) = await self._link.control(
            [dynsec.get_client(topics.username(tenant_id, device_id))]
        )
        # A client of that name outside the device's role is an operator's own: not ours.
        ours = dynsec.error(client) is not None or dynsec.has_role(
            client, topics.role(tenant_id, device_id)
        )
        commands = dynsec.delete_device(tenant_id, device_id, client=ours)
        for response in await self._link.control(commands):
            _check(response, tolerate=dynsec.missing)

    async def _mark(self, tenant_id: str, device_id: str) -> None:
        """Its broker client is reset at the next connection (``reconcile``)."""
        try:
            await self._db.execute(Q["mark_broker_unsynced"], tenant_id, device_id)
        except DatabaseUnavailable as exc:
            log.error(
                "MQTT: the broker client of %s may keep an old token (not marked: %s); "
                "rotate the device's token",
                topics.username(tenant_id, device_id),
                exc,
            )

    def _failed(self, action: str, tenant_id: str, device_id: str, exc: Exception) -> None:
        self._metrics.mqtt_provisioning_failures.inc()
        log.warning(
            "MQTT: could not %s the broker client of %s: %s",
            action,
            topics.username(tenant_id, device_id),
            exc,
        )


def _check(
    response: dict[str, Any], tolerate: Callable[[dict[str, Any]], bool] | None = None
) -> None:
    error = dynsec.error(response)
    if error is None or (tolerate is not None and tolerate(response)):
        return
    raise ProvisioningFailed(f"{response.get('command')}: {error}")
