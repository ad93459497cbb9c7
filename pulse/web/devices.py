"""Device management API (CONTRACT section 3): provision, list, read, delete, rotate tokens.

Every route acts on one tenant: the caller's own, or for operators the one
named by ``tenant_id``. Another tenant's device is answered exactly like a
device that does not exist, so ids never leak across tenants. Every answer
that shows a device shows all of it, its tenant included.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from quart import Blueprint, Response, jsonify, request
from quart_schema import (
    document_querystring,
    document_response,
    security_scheme_blueprint,
    tag_blueprint,
    validate_request,
    validate_response,
)

from pulse.errors import (
    BROKER_UNAVAILABLE,
    DEVICE_EXISTS,
    INVALID_PARAMETER,
    INVALID_PAYLOAD,
    PAYLOAD_TOO_LARGE,
    REQUEST_TIMEOUT,
    TENANT_QUOTA,
    UNKNOWN_DEVICE,
    ApiError,
)
from pulse.fleet import devices
from pulse.fleet.quota import QuotaReached
from pulse.names import is_valid_name, shown_name
from pulse.web import openapi, runtime
from pulse.web.auth import authorize, tenant
from pulse.web.errors import refuse_unknown_parameters
from pulse.web.paging import cursor_of, cut, page_limit

blueprint = Blueprint("devices", __name__, url_prefix="/api/v1/customer/devices")
blueprint.before_request(authorize)
tag_blueprint(blueprint, ["devices"])
security_scheme_blueprint(blueprint, openapi.JWT)

# Provision tokens are shown once: no cache or proxy may keep a copy.
_NO_STORE = {"Cache-Control": "no-store"}
# A page of the list, also without a limit: about 200 KB, where a tenant's 100,000
# devices (PULSE_MAX_DEVICES_PER_TENANT) in one answer were some 20 MB built on the
# event loop while every stream of the process waited. Most tenants' whole fleet still
# fits in one page, so clients from before pages see no change there (docs/fleet.md).
DEVICES_PAGE = 1000


class Device(BaseModel):
    """A device of the tenant."""

    tenant_id: str
    device_id: str
    site_id: str | None
    name: str | None
    status: Literal["ONLINE", "STALE", "OFFLINE"]
    last_seen_at: str | None = Field(
        description="The last reading or heartbeat, to within a second; null: never heard from."
    )
    created_at: str


class ProvisionedDevice(Device):
    """The device and its provision token, shown this once (only its hash is kept)."""

    provision_token: str


class DeviceList(BaseModel):
    """A page of the tenant's devices, by device_id."""

    devices: list[Device]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: last.")


class TenantQuery(BaseModel):
    tenant_id: str | None = Field(default=None, description="Required for operators.")


class DeviceListQuery(TenantQuery):
    limit: int = Field(
        default=DEVICES_PAGE, ge=1, le=DEVICES_PAGE, description="Devices in a page."
    )
    cursor: str | None = Field(default=None, description="next_cursor of the previous page.")


@blueprint.post("")
@document_querystring(TenantQuery)
@validate_request(devices.NewDevice)
@validate_response(ProvisionedDevice, 201)
@openapi.errors(
    *openapi.TENANT_WRITE,
    INVALID_PAYLOAD,
    REQUEST_TIMEOUT,
    PAYLOAD_TOO_LARGE,
    DEVICE_EXISTS,
    TENANT_QUOTA,
)
async def create_device(
    data: devices.NewDevice,
) -> tuple[ProvisionedDevice, int, dict[str, str]]:
    """Provision a device (tenant-admin)."""
    try:
        device = await devices.create_device(
            runtime().db,
            tenant(),
            data,
            runtime().device_credentials,
            limit=runtime().settings.max_devices_per_tenant,
        )
    except devices.DeviceExists:
        raise ApiError(DEVICE_EXISTS, f"Device {data.device_id} already exists.") from None
    except QuotaReached as exc:
        raise ApiError(
            TENANT_QUOTA, f"{exc} Delete some, or raise PULSE_MAX_DEVICES_PER_TENANT."
        ) from None
    return ProvisionedDevice(**device), 201, _NO_STORE


@blueprint.get("")
@document_querystring(DeviceListQuery)
@document_response(DeviceList)
@openapi.errors(*openapi.TENANT_READ, INVALID_PARAMETER)
async def list_devices() -> Response:
    """The tenant's devices, with their status, by device_id, a page at a time."""
    args = request.args
    refuse_unknown_parameters(("limit", "cursor", "tenant_id"))
    limit = page_limit(args.get("limit"), default=DEVICES_PAGE, upper=DEVICES_PAGE)
    # The cursor is the last device_id of the previous page: anything else is not one.
    after = cursor_of(args.get("cursor"), lambda raw: raw if is_valid_name(raw) else None)
    # Not through the models: a fleet of 50,000 devices took 0.5 s of the event loop
    # (every stream of the process waited), two thirds of it building and dumping them.
    rows = await devices.list_devices(runtime().db, tenant(), after=after, limit=limit + 1)
    page, next_cursor = cut(rows, limit, "device_id")
    return jsonify({"devices": page, "next_cursor": next_cursor})


@blueprint.get("/<device_id>")
@document_querystring(TenantQuery)
@validate_response(Device)
@openapi.errors(*openapi.TENANT_READ, INVALID_PARAMETER, UNKNOWN_DEVICE)
async def get_device(device_id: str) -> Device:
    """One device, with its status."""
    refuse_unknown_parameters()
    device = await devices.get_device(runtime().db, tenant(), device_id)
    if device is None:
        raise _unknown_device(device_id)
    return Device(**device)


@blueprint.delete("/<device_id>")
@document_querystring(TenantQuery)
@openapi.answers(
    204, "Deleted, with its own alert rules, and its active alerts closed; the body is empty."
)
@openapi.errors(*openapi.TENANT_WRITE, UNKNOWN_DEVICE)
async def delete_device(device_id: str) -> Response:
    """Delete a device (tenant-admin); its telemetry stays."""
    if not await devices.delete_device(
        runtime().db, tenant(), device_id, runtime().device_credentials
    ):
        raise _unknown_device(device_id)
    return Response(status=204)


@blueprint.post("/<device_id>/rotate-token")
@document_querystring(TenantQuery)
@validate_response(ProvisionedDevice)
@openapi.errors(*openapi.TENANT_WRITE, UNKNOWN_DEVICE, BROKER_UNAVAILABLE)
async def rotate_device_token(device_id: str) -> tuple[ProvisionedDevice, int, dict[str, str]]:
    """A new provision token (tenant-admin); the old one stops working at once."""
    device = await devices.rotate_token(
        runtime().db, tenant(), device_id, runtime().device_credentials
    )
    if device is None:
        raise _unknown_device(device_id)
    return ProvisionedDevice(**device), 200, _NO_STORE


def _unknown_device(device_id: str) -> ApiError:
    return ApiError(UNKNOWN_DEVICE, f"There is no device {shown_name(device_id)} in this tenant.")
