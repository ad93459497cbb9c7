"""The MQTT names: device topics, the shared subscription, broker usernames and roles."""

from __future__ import annotations

import dataclasses
import socket

from pulse.names import is_valid_name

ROOT = "pulse"
# Every Pulse process subscribes in this group: the broker hands each message to
# one of them (MQTT 5 shared subscriptions).
SHARE_GROUP = "pulse"
TELEMETRY = "telemetry"
HEARTBEAT = "heartbeat"
ERRORS = "errors"
INTAKE_KINDS = (TELEMETRY, HEARTBEAT)


@dataclasses.dataclass(frozen=True, slots=True)
class DeviceTopic:
    tenant_id: str
    device_id: str
    kind: str


def subscriptions() -> list[str]:
    """What every Pulse process consumes, shared with the others."""
    return [f"$share/{SHARE_GROUP}/{ROOT}/+/+/{kind}" for kind in INTAKE_KINDS]


def parse(topic: str) -> DeviceTopic | None:
    """``pulse/<tenant_id>/<device_id>/<kind>`` with valid ids; None for anything else."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != ROOT:
        return None
    _, tenant_id, device_id, kind = parts
    if not (is_valid_name(tenant_id) and is_valid_name(device_id)):
        return None
    return DeviceTopic(tenant_id, device_id, kind)


def device_topic(tenant_id: str, device_id: str, kind: str) -> str:
    return f"{ROOT}/{tenant_id}/{device_id}/{kind}"


def username(tenant_id: str, device_id: str) -> str:
    """The device's broker username (its password is its provision token)."""
    return f"{tenant_id}/{device_id}"


def client_id(tenant_id: str, device_id: str) -> str:
    """The only MQTT client id the broker accepts from the device: its username. Unique
    per device, so no device can take another's session, nor Pulse's (whose ids,
    ``pulse-<hostname>`` by default, are never ``<tenant_id>/<device_id>``)."""
    return username(tenant_id, device_id)


def parse_username(name: str) -> tuple[str, str] | None:
    """(tenant_id, device_id) of a device's username; None for any other broker client."""
    tenant_id, slash, device_id = name.partition("/")
    if not slash or not (is_valid_name(tenant_id) and is_valid_name(device_id)):
        return None
    return tenant_id, device_id


def role(tenant_id: str, device_id: str) -> str:
    """The device's own role: what it may publish and read, and nothing else."""
    return f"pulse-device/{tenant_id}/{device_id}"


def default_client_id() -> str:
    """This process's MQTT session when PULSE_MQTT_CLIENT_ID is unset: stable across
    restarts on this host, so the session comes back (``pulse serve --workers`` adds
    each worker's number)."""
    return f"pulse-{socket.gethostname()}"
