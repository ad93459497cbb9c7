"""Fleet HTTP API (CONTRACT section 4): summary, alerts and alert rules; and ``install``.

Reads serve any role. Operators read one tenant with ``tenant_id``, or every
tenant without it (each alert then names its tenant). Changes need
tenant-admin or operator-admin and act on one tenant. Another tenant's alert
or rule is answered exactly like one that does not exist.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from quart import Blueprint, Quart, Response, g, jsonify, request
from quart_schema import document_querystring, document_response, validate_request

from pulse.app import runtime
from pulse.auth.http import authenticate_request, request_tenant
from pulse.auth.principal import ADMIN_ROLES, Principal
from pulse.errors import ApiError
from pulse.fleet import alerts, rules
from pulse.fleet.summary import fleet_summary
from pulse.fleet.sweeper import StatusSweeper
from pulse.ingest.handling import ingest_writer

PREFIX = "/api/v1/customer"
DEFAULT_PAGE = 50
MAX_PAGE = 500
_MAX_ID = 2**63 - 1

fleet_bp = Blueprint("fleet", __name__, url_prefix=PREFIX + "/fleet")
alerts_bp = Blueprint("alerts", __name__, url_prefix=PREFIX + "/alerts")
rules_bp = Blueprint("alert_rules", __name__, url_prefix=PREFIX + "/alert-rules")
BLUEPRINTS = (fleet_bp, alerts_bp, rules_bp)


def install(app: Quart) -> None:
    """Register the blueprints, and at startup the rules hook and the status sweeper.

    Call it after the app's own startup is registered: this startup needs the pool.
    """
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)

    @app.before_serving
    async def _start_fleet() -> None:
        rt = runtime()
        assert rt.pool is not None, "install(app) must come after the app's startup"
        ingest_writer(app).add_hook(rules.evaluate_alerts)
        sweeper = StatusSweeper(
            rt.dsn,
            stale_after_s=rt.settings.stale_after_s,
            offline_after_s=rt.settings.offline_after_s,
        )
        app.extensions["pulse.fleet.sweeper"] = sweeper
        rt.supervisor.start("status-sweeper", sweeper.run)


# -- documentation models (the handlers build the JSON themselves) ------------


class TenantQuery(BaseModel):
    tenant_id: str | None = Field(
        default=None, description="Operators: the tenant; without it, every tenant."
    )


class TenantRequiredQuery(BaseModel):
    tenant_id: str | None = Field(default=None, description="Required for operators.")


class FleetSummary(BaseModel):
    ONLINE: int
    STALE: int
    OFFLINE: int
    total: int
    active_alerts: int


class Alert(BaseModel):
    alert_id: int
    device_id: str
    alert_type: Literal["THRESHOLD", "NO_HEARTBEAT"]
    severity: int
    status: Literal["OPEN", "ACKNOWLEDGED", "CLOSED"]
    summary: str
    details: dict[str, Any]
    created_at: str
    updated_at: str
    tenant_id: str | None = Field(default=None, description="Only in cross-tenant lists.")


class AlertList(BaseModel):
    alerts: list[Alert]
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: last.")


class AlertQuery(TenantQuery):
    status: Literal["active", "OPEN", "ACKNOWLEDGED", "CLOSED"] | None = Field(
        default=None, description="active: OPEN and ACKNOWLEDGED; default: every status."
    )
    limit: int = Field(default=DEFAULT_PAGE, ge=1, le=MAX_PAGE)
    cursor: str | None = Field(default=None, description="next_cursor of the previous page.")


class Rule(BaseModel):
    rule_id: int
    name: str
    metric: str
    operator: str
    threshold: float
    severity: int
    device_id: str | None
    created_at: str


class RuleList(BaseModel):
    rules: list[Rule]


# -- who may do what -----------------------------------------------------------


async def _authorize(*, cross_tenant_reads: bool) -> None:
    # Before body validation, so a caller without the right to write is told
    # 401/403 rather than how to fix a body it may not send.
    writes = request.method not in ("GET", "HEAD", "OPTIONS")
    principal = await authenticate_request(roles=ADMIN_ROLES if writes else None)
    g.principal = principal
    if cross_tenant_reads and not writes and principal.is_operator:
        g.tenant_id = request_tenant(principal) if request.args.get("tenant_id") else None
    else:
        g.tenant_id = request_tenant(principal)


@fleet_bp.before_request
@alerts_bp.before_request
async def _authorize_reads_across_tenants() -> None:
    await _authorize(cross_tenant_reads=True)


@rules_bp.before_request
async def _authorize_one_tenant() -> None:
    await _authorize(cross_tenant_reads=False)


def _scope() -> str | None:
    """The tenant acted on; None: every tenant (an operator's read)."""
    tenant: str | None = g.tenant_id
    return tenant


def _tenant() -> str:
    tenant = _scope()
    assert tenant is not None
    return tenant


def _principal() -> Principal:
    principal: Principal = g.principal
    return principal


# -- fleet summary -------------------------------------------------------------


@fleet_bp.get("/summary")
@document_querystring(TenantQuery)
@document_response(FleetSummary)
async def summary() -> Response:
    return jsonify(await fleet_summary(runtime().pool, _scope()))


# -- alerts ---------------------------------------------------------------------


@alerts_bp.get("")
@document_querystring(AlertQuery)
@document_response(AlertList)
async def list_alerts() -> Response:
    args = request.args
    status = args.get("status") or None
    statuses = alerts.STATUS_FILTERS.get(status) if status else (*alerts.ACTIVE, alerts.CLOSED)
    if statuses is None:
        raise _bad_parameter("status must be one of active, OPEN, ACKNOWLEDGED and CLOSED.")
    limit = _integer(args.get("limit"), "limit", upper=MAX_PAGE) or DEFAULT_PAGE
    before = _integer(args.get("cursor"), "cursor", upper=_MAX_ID)
    # One more than asked tells whether there is a next page.
    page = await alerts.list_alerts(
        runtime().pool, _scope(), statuses, before=before, limit=limit + 1
    )
    more = len(page) > limit
    page = page[:limit]
    next_cursor = str(page[-1]["alert_id"]) if more else None
    return jsonify({"alerts": page, "next_cursor": next_cursor})


@alerts_bp.post("/<alert_id>/acknowledge")
@document_querystring(TenantRequiredQuery)
@document_response(Alert)
async def acknowledge_alert(alert_id: str) -> Response:
    return await _change_alert(alert_id, "acknowledge")


@alerts_bp.post("/<alert_id>/close")
@document_querystring(TenantRequiredQuery)
@document_response(Alert)
async def close_alert(alert_id: str) -> Response:
    return await _change_alert(alert_id, "close")


async def _change_alert(raw_id: str, action: alerts.Action) -> Response:
    alert_id = _id(raw_id)
    if alert_id is None:
        raise _unknown_alert(raw_id)
    try:
        alert = await alerts.change_alert(
            runtime().pool, _tenant(), alert_id, action, _principal().subject
        )
    except alerts.UnknownAlert:
        raise _unknown_alert(raw_id) from None
    except alerts.AlertClosed as exc:
        raise ApiError(409, "alert_closed", str(exc)) from None
    return jsonify(alert)


def _unknown_alert(raw_id: str) -> ApiError:
    return ApiError(404, "unknown_alert", f"There is no alert {raw_id[:40]} in this tenant.")


# -- alert rules ---------------------------------------------------------------


@rules_bp.post("")
@document_querystring(TenantRequiredQuery)
@validate_request(rules.NewRule)
@document_response(Rule, 201)
async def create_rule(data: rules.NewRule) -> tuple[Response, int]:
    try:
        rule = await rules.create_rule(runtime().pool, _tenant(), data)
    except rules.UnknownDevice:
        raise ApiError(
            404, "unknown_device", f"There is no device {data.device_id} in this tenant."
        ) from None
    return jsonify(rule), 201


@rules_bp.get("")
@document_querystring(TenantRequiredQuery)
@document_response(RuleList)
async def list_rules() -> Response:
    return jsonify({"rules": await rules.list_rules(runtime().pool, _tenant())})


@rules_bp.delete("/<rule_id>")
@document_querystring(TenantRequiredQuery)
async def delete_rule(rule_id: str) -> Response:
    parsed = _id(rule_id)
    deleted = parsed is not None and await rules.delete_rule(
        runtime().pool, _tenant(), parsed, _principal().subject
    )
    if not deleted:
        raise ApiError(404, "unknown_rule", f"There is no rule {rule_id[:40]} in this tenant.")
    return Response(status=204)


# -- parameters ----------------------------------------------------------------


def _id(raw: str) -> int | None:
    """A row id from a URL; None for anything that cannot be one (then: not found)."""
    return _positive(raw, _MAX_ID)


def _integer(raw: str | None, name: str, *, upper: int) -> int | None:
    """An optional integer query parameter from 1 to ``upper``; None when absent."""
    if raw is None or raw == "":
        return None
    value = _positive(raw, upper)
    if value is None:
        raise _bad_parameter(f"{name} must be an integer from 1 to {upper}.")
    return value


def _positive(raw: str, upper: int) -> int | None:
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or not 1 <= int(raw) <= upper:
        return None
    return int(raw)


def _bad_parameter(detail: str) -> ApiError:
    return ApiError(400, "invalid_parameter", detail)
