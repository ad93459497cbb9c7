"""Device management API (CONTRACT section 3): provision, list, delete, rotate tokens.

Every route acts on one tenant: the caller's own, or for operators the one
named by ``tenant_id``. Another tenant's device is answered exactly like a
device that does not exist, so ids never leak across tenants.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from quart import Blueprint, Response
from quart_schema import document_querystring, validate_request, validate_response

from pulse.errors import DEVICE_EXISTS, UNKNOWN_DEVICE, ApiError
from pulse.fleet import devices
from pulse.web import runtime
from pulse.web.auth import authorize, tenant

blueprint = Blueprint("devices", __name__, url_prefix="/api/v1/customer/devices")
blueprint.before_request(authorize)

# Provision tokens are shown once: no cache or proxy may keep a copy.
_NO_STORE = {"Cache-Control": "no-store"}


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


@blueprint.post("")
@document_querystring(TenantQuery)
@validate_request(devices.NewDevice)
@validate_response(ProvisionedDevice, 201)
async def create_device(
    data: devices.NewDevice,
) -> tuple[ProvisionedDevice, int, dict[str, str]]:
    try:
        token = await devices.create_device(runtime().db, tenant(), data)
    except devices.DeviceExists:
        raise ApiError(DEVICE_EXISTS, f"Device {data.device_id} already exists.") from None
    return ProvisionedDevice(device_id=data.device_id, provision_token=token), 201, _NO_STORE


@blueprint.get("")
@document_querystring(TenantQuery)
@validate_response(DeviceList)
async def list_devices() -> DeviceList:
    rows = await devices.list_devices(runtime().db, tenant())
    return DeviceList(devices=[Device(**row) for row in rows])


@blueprint.delete("/<device_id>")
@document_querystring(TenantQuery)
async def delete_device(device_id: str) -> Response:
    if not await devices.delete_device(runtime().db, tenant(), device_id):
        raise _unknown_device(device_id)
    return Response(status=204)


@blueprint.post("/<device_id>/rotate-token")
@document_querystring(TenantQuery)
@validate_response(ProvisionedDevice)
async def rotate_device_token(device_id: str) -> tuple[ProvisionedDevice, int, dict[str, str]]:
    token = await devices.rotate_token(runtime().db, tenant(), device_id)
    if token is None:
        raise _unknown_device(device_id)
    return ProvisionedDevice(device_id=device_id, provision_token=token), 200, _NO_STORE


def _unknown_device(device_id: str) -> ApiError:
    return ApiError(UNKNOWN_DEVICE, f"There is no device {device_id} in this tenant.")
