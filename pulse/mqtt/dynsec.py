"""Mosquitto's dynamic-security commands for Pulse's devices and for Pulse itself.

Each device is a broker client (username ``<tenant_id>/<device_id>``, password its
provision token) with a role of its own that allows exactly its topics: publish
its telemetry and heartbeats, read its errors. Nothing is allowed by patterns,
so no device can publish as another device or another tenant.

Each device's client also has a fixed MQTT client id, its username: the broker refuses
it any other (CONNACK 135, not authorized). A client id names a session, and a
connection under one that is in use takes that session over (its subscriptions and
queued messages): without the fixed id, a device's token let it take Pulse's own
session, and every tenant's readings with it, or another device's.
"""

from __future__ import annotations

from typing import Any

from pulse.mqtt import topics

CONTROL = "$CONTROL/dynamic-security/v1"
RESPONSE = f"{CONTROL}/response"
# Pulse's own role, given to the admin user of PULSE_MQTT_URL: it answers every
# device on its errors topic and consumes every device topic.
SERVICE_ROLE = "pulse-service"

Command = dict[str, Any]


def _acl(acltype: str, topic: str) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": True, "priority": 0}


def get_client(username: str) -> Command:
    return {"command": "getClient", "username": username}


def has_role(response: dict[str, Any], rolename: str) -> bool:
    """Whether a getClient response shows the client in the role."""
    return in_role((response.get("data") or {}).get("client") or {}, rolename)


def in_role(client: dict[str, Any], rolename: str) -> bool:
    """Whether a client (of getClient, or of a verbose listClients) is in the role."""
    return any(role.get("rolename") == rolename for role in client.get("roles") or [])


def service_role(admin_username: str) -> list[Command]:
    """Pulse's role, and the admin user in it (the role may exist already). The broker
    disconnects the admin's clients when it gets the role, to apply it."""
    acls = [_acl("publishClientSend", topics.device_topic("+", "+", topics.ERRORS))]
    for kind in topics.INTAKE_KINDS:
        acls.append(_acl("subscribePattern", topics.device_topic("+", "+", kind)))
        acls.append(_acl("publishClientReceive", topics.device_topic("+", "+", kind)))
    return [
        {"command": "createRole", "rolename": SERVICE_ROLE, "acls": acls},
        {"command": "addClientRole", "username": admin_username, "rolename": SERVICE_ROLE},
    ]


def device_role(tenant_id: str, device_id: str) -> Command:
    def own(kind: str) -> str:
        return topics.device_topic(tenant_id, device_id, kind)

    return {
        "command": "createRole",
        "rolename": topics.role(tenant_id, device_id),
        "acls": [
            _acl("publishClientSend", own(topics.TELEMETRY)),
            _acl("publishClientSend", own(topics.HEARTBEAT)),
            _acl("subscribePattern", own(topics.ERRORS)),
            _acl("publishClientReceive", own(topics.ERRORS)),
        ],
    }


def create_client(tenant_id: str, device_id: str, password: str | None) -> Command:
    """The device's client in its role; without a password it cannot connect."""
    command: Command = {
        "command": "createClient",
        "username": topics.username(tenant_id, device_id),
        "clientid": topics.client_id(tenant_id, device_id),
        "roles": [{"rolename": topics.role(tenant_id, device_id)}],
    }
    if password is not None:
        command["password"] = password
    return command


def set_password(tenant_id: str, device_id: str, password: str) -> Command:
    return {
        "command": "setClientPassword",
        "username": topics.username(tenant_id, device_id),
        "password": password,
    }


def set_client_id(tenant_id: str, device_id: str) -> Command:
    """Fix the client id of a device's client made without one (by an older Pulse: see
    ``Provisioner.reconcile``). The broker disconnects the client's connections."""
    return {
        "command": "setClientId",
        "username": topics.username(tenant_id, device_id),
        "clientid": topics.client_id(tenant_id, device_id),
    }


def delete_device(tenant_id: str, device_id: str, *, client: bool = True) -> list[Command]:
    """The device's role, and its client unless ``client`` is False (a client of that
    name that is an operator's own)."""
    role = {"command": "deleteRole", "rolename": topics.role(tenant_id, device_id)}
    if not client:
        return [role]
    return [{"command": "deleteClient", "username": topics.username(tenant_id, device_id)}, role]


def list_clients(offset: int, count: int) -> Command:
    """A page of the broker's clients, each with its client id (when fixed) and roles."""
    return {"command": "listClients", "verbose": True, "count": count, "offset": offset}


def listed_clients(response: dict[str, Any]) -> list[dict[str, Any]]:
    """The clients of a verbose listClients response."""
    return [c for c in (response.get("data") or {}).get("clients") or [] if isinstance(c, dict)]


def error(response: dict[str, Any]) -> str | None:
    """A response's error, None when the command succeeded."""
    value = response.get("error")
    return None if value is None else str(value)


def exists(response: dict[str, Any]) -> bool:
    """The command failed only because what it creates exists already."""
    return "already" in (error(response) or "").lower()


def missing(response: dict[str, Any]) -> bool:
    """The command failed only because what it acts on does not exist."""
    return "not found" in (error(response) or "").lower()
