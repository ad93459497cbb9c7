"""Devices of a tenant: provision, list, delete, rotate their tokens.

A device's provision token is shown once, when it is made; only its hash is
kept (``pulse.auth.device_tokens``). Another tenant's device is the same as
one that does not exist.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from pulse.auth.device_tokens import new_device_token
from pulse.db.database import Database
from pulse.db.queries import load_queries
from pulse.fleet.fields import Name, Text
from pulse.names import is_valid_name
from pulse.times import format_time

Q = load_queries(__package__)


class NewDevice(BaseModel):
    device_id: Name
    site_id: Text | None = Field(default=None, max_length=64)
    name: Text | None = Field(default=None, max_length=200)


class DeviceExists(Exception):
    """The tenant already has a device with this id."""


def device_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """A device as the API shows it."""
    return {
        "device_id": row["device_id"],
        "site_id": row["site_id"],
        "name": row["name"],
        "status": row["status"],
        "last_seen_at": _optional_time(row["last_seen_at"]),
        "created_at": format_time(row["created_at"]),
    }


async def create_device(db: Database, tenant_id: str, device: NewDevice) -> str:
    """Provision ``device`` (and its tenant, on the first device); return its token."""
    token, token_hash = new_device_token()
    async with db.transaction() as conn:
        await conn.execute(Q["ensure_tenant"], tenant_id)
        created = await conn.fetchval(
            Q["insert_device"], tenant_id, device.device_id, device.site_id, device.name, token_hash
        )
    if created is None:
        raise DeviceExists(device.device_id)
    return token


async def list_devices(db: Database, tenant_id: str) -> list[dict[str, Any]]:
    return [device_json(row) for row in await db.fetch(Q["list_devices"], tenant_id)]


async def delete_device(db: Database, tenant_id: str, device_id: str) -> bool:
    """Delete a device and close its active alerts; False when there is no such device."""
    if not is_valid_name(device_id):  # from a URL: no such device (nor NUL for PostgreSQL)
        return False
    return await db.fetchval(Q["delete_device"], tenant_id, device_id) is not None


async def rotate_token(db: Database, tenant_id: str, device_id: str) -> str | None:
    """A new token for the device, the old one revoked; None when there is no such device."""
    if not is_valid_name(device_id):
        return None
    token, token_hash = new_device_token()
    updated = await db.fetchval(Q["replace_device_token"], tenant_id, device_id, token_hash)
    return None if updated is None else token


def _optional_time(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)
