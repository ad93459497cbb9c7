"""Device management API (CONTRACT section 3): provision, list, delete, rotate tokens.

Every route acts on one tenant: the caller's own, or for operators the one
named by ``tenant_id``. Another tenant's device is answered exactly like a
device that does not exist, so ids never leak across tenants.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, cast

from pydantic import BaseModel, Field
from quart import Blueprint, Response, g, request
from quart_schema import document_querystring, validate_request, validate_response

from pulse.app import runtime
from pulse.auth.device_tokens import new_device_token
from pulse.auth.http import authenticate_request, request_tenant
from pulse.auth.principal import ADMIN_ROLES
from pulse.db.errors import translate_errors
from pulse.db.queries import load_queries
from pulse.errors import ApiError
from pulse.fleet.fields import Name
from pulse.times import format_time

Q = load_queries(__package__)

blueprint = Blueprint("devices", __name__, url_prefix="/api/v1/customer/devices")

# Provision tokens are shown once: no cache or proxy may keep a copy.
_NO_STORE = {"Cache-Control": "no-store"}


class NewDevice(BaseModel):
    device_id: Name
    site_id: str | None = Field(default=None, max_length=64)
    name: str | None = Field(default=None, max_length=200)


class ProvisionedDevice(BaseModel):
    device_id: str
    provision_token: str


class Device(BaseModel):
    device_id: str
    site_id: str | None
    name: str | None
    status: Literal["ONLINE", "STALE", "OFFLINE"]
    last_seen_at: str | None
    created_at: str


class DeviceList(BaseModel):
    devices: list[Device]


class TenantQuery(BaseModel):
    tenant_id: str | None = Field(default=None, description="Required for operators.")


@blueprint.before_request
async def _authorize() -> None:
    # Runs before body validation, so a caller without the right to write is
    # told 401/403 rather than how to fix a body it may not send.
    writes = request.method not in ("GET", "HEAD", "OPTIONS")
    principal = await authenticate_request(roles=ADMIN_ROLES if writes else None)
    g.tenant_id = request_tenant(principal)


def _tenant() -> str:
    return cast(str, g.tenant_id)


@blueprint.post("")
@document_querystring(TenantQuery)
@validate_request(NewDevice)
@validate_response(ProvisionedDevice, 201)
async def create_device(data: NewDevice) -> tuple[ProvisionedDevice, int, dict[str, str]]:
    tenant = _tenant()
    token, token_hash = new_device_token()
    with translate_errors():
        async with runtime().pool.acquire() as conn, conn.transaction():
            await conn.execute(Q["ensure_tenant"], tenant)
            created = await conn.fetchval(
                Q["insert_device"], tenant, data.device_id, data.site_id, data.name, token_hash
            )
    if created is None:
        raise ApiError(409, "device_exists", f"Device {data.device_id} already exists.")
    return ProvisionedDevice(device_id=data.device_id, provision_token=token), 201, _NO_STORE


@blueprint.get("")
@document_querystring(TenantQuery)
@validate_response(DeviceList)
async def list_devices() -> DeviceList:
    with translate_errors():
        rows = await runtime().pool.fetch(Q["list_devices"], _tenant())
    return DeviceList(
        devices=[
            Device(
                device_id=row["device_id"],
                site_id=row["site_id"],
                name=row["name"],
                status=row["status"],
                last_seen_at=_optional_time(row["last_seen_at"]),
                created_at=format_time(row["created_at"]),
            )
            for row in rows
        ]
    )


@blueprint.delete("/<device_id>")
@document_querystring(TenantQuery)
async def delete_device(device_id: str) -> Response:
    with translate_errors():
        deleted = await runtime().pool.fetchval(Q["delete_device"], _tenant(), device_id)
    if deleted is None:
        raise _unknown_device(device_id)
    return Response(status=204)


@blueprint.post("/<device_id>/rotate-token")
@document_querystring(TenantQuery)
@validate_response(ProvisionedDevice)
async def rotate_device_token(device_id: str) -> tuple[ProvisionedDevice, int, dict[str, str]]:
    token, token_hash = new_device_token()
    with translate_errors():
        updated = await runtime().pool.fetchval(
            Q["replace_device_token"], _tenant(), device_id, token_hash
        )
    if updated is None:
        raise _unknown_device(device_id)
    return ProvisionedDevice(device_id=device_id, provision_token=token), 200, _NO_STORE


def _unknown_device(device_id: str) -> ApiError:
    return ApiError(404, "unknown_device", f"There is no device {device_id} in this tenant.")


def _optional_time(moment: datetime | None) -> str | None:
    return None if moment is None else format_time(moment)
