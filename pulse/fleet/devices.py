"""Devices of a tenant: provision, list, read, delete, rotate their tokens.

A device's provision token is shown once, when it is made or rotated; only its
hash is kept (``pulse.auth.device_tokens``). Another tenant's device is the
same as one that does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from pulse.auth.device_tokens import new_device_token
from pulse.db.database import Database
from pulse.db.queries import load_queries
from pulse.fleet.fields import DeviceId, TextUpTo64, TextUpTo200
from pulse.fleet.quota import check_quota, lock_quota
from pulse.names import is_valid_name
from pulse.times import format_time

Q = load_queries(__package__)


class NewDevice(BaseModel):
    # Unknown fields are refused, as for readings and rules: a typo ("site") is
    # reported rather than silently dropped.
    model_config = ConfigDict(extra="forbid")

    device_id: DeviceId
    site_id: TextUpTo64 | None = None
    name: TextUpTo200 | None = None


class DeviceExists(Exception):
    """The tenant already has a device with this id."""


class Credentials(Protocol):
    """Where a device's credentials live besides its token hash here (the MQTT broker,
    ``pulse.mqtt.provision``). ``created`` and ``deleted`` follow the change and never
    raise (what they could not do is put right later); ``rotating`` comes before it and
    raises to refuse it, so that an old token never keeps working anywhere."""

    async def created(self, tenant_id: str, device_id: str, token: str) -> None: ...

    async def rotating(self, tenant_id: str, device_id: str, token: str) -> None: ...

    async def deleted(self, tenant_id: str, device_id: str) -> None: ...


class NoCredentials:
    """Only Pulse's own table (no MQTT)."""

    async def created(self, tenant_id: str, device_id: str, token: str) -> None:
        pass

    async def rotating(self, tenant_id: str, device_id: str, token: str) -> None:
        pass

    async def deleted(self, tenant_id: str, device_id: str) -> None:
        pass


NO_CREDENTIALS = NoCredentials()


def device_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A device as the API shows it: the same fields wherever it appears."""
    return {
        "tenant_id": row["tenant_id"],
        "device_id": row["device_id"],
        "site_id": row["site_id"],
        "name": row["name"],
        "status": row["status"],
        "last_seen_at": _optional_time(row["last_seen_at"]),
        "created_at": format_time(row["created_at"]),
    }


async def create_device(
    db: Database,
    tenant_id: str,
    device: NewDevice,
    credentials: Credentials = NO_CREDENTIALS,
    *,
    limit: int | None = None,
) -> dict[str, Any]:
    """Provision ``device`` (and its tenant, on the first device): the device with its
    ``provision_token``, shown this once. QuotaReached when the tenant has ``limit``."""
    token, token_hash = new_device_token()
    async with db.transaction() as conn:
        if limit is not None:
            await lock_quota(conn, tenant_id)
        await conn.execute(Q["ensure_tenant"], tenant_id)
        row = await conn.fetchrow(
            Q["insert_device"], tenant_id, device.device_id, device.site_id, device.name, token_hash
        )
        if row is None:
            raise DeviceExists(device.device_id)
        if limit is not None:
            await check_quota(conn, tenant_id, "devices", limit)
    await credentials.created(tenant_id, device.device_id, token)
    return {**device_json(row), "provision_token": token}


async def list_devices(
    db: Database, tenant_id: str, *, after: str | None = None, limit: int
) -> list[dict[str, Any]]:
    """At most ``limit`` of the tenant's devices by device_id, after ``after`` if given."""
    # "" sorts before every device id (none is empty): the first page, through the
    # same index range as the others.
    rows = await db.fetch(Q["list_devices"], tenant_id, after or "", limit)
    return [device_json(row) for row in rows]


async def get_device(db: Database, tenant_id: str, device_id: str) -> dict[str, Any] | None:
    if not is_valid_name(device_id):  # from a URL: no such device (nor NUL for PostgreSQL)
        return None
    row = await db.fetchrow(Q["get_device"], tenant_id, device_id)
    return None if row is None else device_json(row)


async def delete_device(
    db: Database, tenant_id: str, device_id: str, credentials: Credentials = NO_CREDENTIALS
) -> bool:
    """Delete a device, its own alert rules, and close its active alerts; False when there
    is no such device."""
    if not is_valid_name(device_id):  # from a URL: no such device (nor NUL for PostgreSQL)
        return False
    async with db.transaction() as conn:
        # Between two of the tenant's ingest transactions: one that raised an alert for
        # the device has committed it, to be closed below; the next finds no device.
        await conn.execute(Q["lock_tenant_writes"], tenant_id)
        if await conn.fetchval(Q["delete_device"], tenant_id, device_id) is None:
            return False
        await conn.execute(Q["close_device_alerts"], tenant_id, device_id)
        await conn.execute(Q["delete_device_rules"], tenant_id, device_id)
        await conn.execute(Q["forget_device_seqs"], tenant_id, device_id)
    await credentials.deleted(tenant_id, device_id)
    return True


async def rotate_token(
    db: Database, tenant_id: str, device_id: str, credentials: Credentials = NO_CREDENTIALS
) -> dict[str, Any] | None:
    """A new token for the device, the old one revoked: the device with its new
    ``provision_token``; None when there is no such device."""
    if not is_valid_name(device_id):
        return None
    token, token_hash = new_device_token()
    # The broker is told inside the transaction that stores the new hash: if it cannot
    # be told, the transaction rolls back; if the database fails first, the broker is
    # never told. Either way nothing changes (only a failure of COMMIT itself, after
    # the broker took the token, would leave them apart).
    async with db.transaction() as conn:
        row = await conn.fetchrow(Q["replace_device_token"], tenant_id, device_id, token_hash)
        if row is None:
            return None
        await credentials.rotating(tenant_id, device_id, token)
    return {**device_json(row), "provision_token": token}


def _optional_time(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)
