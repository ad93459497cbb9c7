"""Fleet HTTP API (CONTRACT section 4): summary, alerts and alert rules.

Reads serve any role. Operators read one tenant with ``tenant_id``, or every
tenant without it (each alert then names its tenant). Changes need
tenant-admin or operator-admin and act on one tenant. Another tenant's alert
or rule is answered exactly like one that does not exist.
"""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import BaseModel, Field
from quart import Blueprint, Response, jsonify, request
from quart_schema import (
    document_querystring,
    document_response,
    security_scheme_blueprint,
    tag_blueprint,
    validate_request,
)

from pulse.errors import (
    ALERT_CLOSED,
    INVALID_PARAMETER,
    INVALID_PAYLOAD,
    PAYLOAD_TOO_LARGE,
    REQUEST_TIMEOUT,
    TENANT_QUOTA,
    UNKNOWN_ALERT,
    UNKNOWN_DEVICE,
    UNKNOWN_RULE,
    ApiError,
)
from pulse.fleet import alerts, rules
from pulse.fleet.quota import QuotaReached
from pulse.fleet.summary import fleet_summary
from pulse.names import shown_name
from pulse.web import openapi, runtime
from pulse.web.auth import authorize, principal, scope, tenant
from pulse.web.errors import refuse_unknown_parameters
from pulse.web.paging import bad_parameter, cut, id_cursor, page_limit, positive

PREFIX = "/api/v1/customer"
DEFAULT_PAGE = 50
MAX_PAGE = 500
# Rules are read whole by those who use them (the dashboard, the simulator): one page
# holds a tenant's every rule under the default quota (PULSE_MAX_RULES_PER_TENANT).
RULES_PAGE = 1000

fleet_bp = Blueprint("fleet", __name__, url_prefix=PREFIX + "/fleet")
alerts_bp = Blueprint("alerts", __name__, url_prefix=PREFIX + "/alerts")
rules_bp = Blueprint("alert_rules", __name__, url_prefix=PREFIX + "/alert-rules")
BLUEPRINTS = (fleet_bp, alerts_bp, rules_bp)

fleet_bp.before_request(functools.partial(authorize, cross_tenant_reads=True))
alerts_bp.before_request(functools.partial(authorize, cross_tenant_reads=True))
rules_bp.before_request(authorize)
for _blueprint, _tag in ((fleet_bp, "fleet"), (alerts_bp, "alerts"), (rules_bp, "alert-rules")):
    tag_blueprint(_blueprint, [_tag])
    security_scheme_blueprint(_blueprint, openapi.JWT)


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


class AlertList(BaseModel):
    alerts: list[alerts.AlertJson]
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
    next_cursor: str | None = Field(description="Pass as cursor for the next page; null: last.")


class RuleQuery(TenantRequiredQuery):
    limit: int = Field(
        default=RULES_PAGE, ge=1, le=RULES_PAGE, description="Rules in a page, oldest first."
    )
    cursor: str | None = Field(default=None, description="next_cursor of the previous page.")


# -- fleet summary -------------------------------------------------------------


@fleet_bp.get("/summary")
@document_querystring(TenantQuery)
@document_response(FleetSummary)
@openapi.errors(*openapi.CROSS_TENANT_READ, INVALID_PARAMETER)
async def summary() -> Response:
    """Devices by status, and the number of active alerts."""
    refuse_unknown_parameters()
    return jsonify(await fleet_summary(runtime().db, scope()))


# -- alerts ---------------------------------------------------------------------


@alerts_bp.get("")
@document_querystring(AlertQuery)
@document_response(AlertList)
@openapi.errors(*openapi.CROSS_TENANT_READ, INVALID_PARAMETER)
async def list_alerts() -> Response:
    """Alerts, newest first, a page at a time."""
    args = request.args
    refuse_unknown_parameters(("status", "limit", "cursor", "tenant_id"))
    status = args.get("status") or None
    statuses = alerts.STATUS_FILTERS.get(status) if status else (*alerts.ACTIVE, alerts.CLOSED)
    if statuses is None:
        raise bad_parameter("status must be one of active, OPEN, ACKNOWLEDGED and CLOSED.")
    limit = page_limit(args.get("limit"), default=DEFAULT_PAGE, upper=MAX_PAGE)
    before = id_cursor(args.get("cursor"))
    # One more than asked tells whether there is a next page.
    rows = await alerts.list_alerts(runtime().db, scope(), statuses, before=before, limit=limit + 1)
    page, next_cursor = cut(rows, limit, "alert_id")
    return jsonify({"alerts": page, "next_cursor": next_cursor})


@alerts_bp.post("/<alert_id>/acknowledge")
@document_querystring(TenantRequiredQuery)
@document_response(alerts.AlertJson)
@openapi.errors(*openapi.TENANT_WRITE, UNKNOWN_ALERT, ALERT_CLOSED)
async def acknowledge_alert(alert_id: str) -> Response:
    """Acknowledge an alert (tenant-admin)."""
    return await _change_alert(alert_id, "acknowledge")


@alerts_bp.post("/<alert_id>/close")
@document_querystring(TenantRequiredQuery)
@document_response(alerts.AlertJson)
@openapi.errors(*openapi.TENANT_WRITE, UNKNOWN_ALERT)
async def close_alert(alert_id: str) -> Response:
    """Close an alert (tenant-admin)."""
    return await _change_alert(alert_id, "close")


async def _change_alert(raw_id: str, action: alerts.Action) -> Response:
    alert_id = _id(raw_id)
    if alert_id is None:
        raise _unknown_alert(raw_id)
    try:
        alert = await alerts.change_alert(
            runtime().db, tenant(), alert_id, action, principal().subject
        )
    except alerts.UnknownAlert:
        raise _unknown_alert(raw_id) from None
    except alerts.AlertClosed as exc:
        raise ApiError(ALERT_CLOSED, str(exc)) from None
    return jsonify(alert)


def _unknown_alert(raw_id: str) -> ApiError:
    return ApiError(UNKNOWN_ALERT, f"There is no alert {shown_name(raw_id)} in this tenant.")


# -- alert rules ---------------------------------------------------------------


@rules_bp.post("")
@document_querystring(TenantRequiredQuery)
@validate_request(rules.NewRule)
@document_response(Rule, 201)
@openapi.errors(
    *openapi.TENANT_WRITE,
    INVALID_PAYLOAD,
    REQUEST_TIMEOUT,
    PAYLOAD_TOO_LARGE,
    UNKNOWN_DEVICE,
    TENANT_QUOTA,
)
async def create_rule(data: rules.NewRule) -> tuple[Response, int]:
    """Create a threshold rule (tenant-admin)."""
    try:
        rule = await rules.create_rule(
            runtime().db, tenant(), data, limit=runtime().settings.max_rules_per_tenant
        )
    except QuotaReached as exc:
        raise ApiError(
            TENANT_QUOTA, f"{exc} Delete some, or raise PULSE_MAX_RULES_PER_TENANT."
        ) from None
    except rules.UnknownDevice:
        raise ApiError(
            UNKNOWN_DEVICE, f"There is no device {data.device_id} in this tenant."
        ) from None
    return jsonify(rule), 201


@rules_bp.get("")
@document_querystring(RuleQuery)
@document_response(RuleList)
@openapi.errors(*openapi.TENANT_READ, INVALID_PARAMETER)
async def list_rules() -> Response:
    """The tenant's rules, oldest first, a page at a time."""
    args = request.args
    refuse_unknown_parameters(("limit", "cursor", "tenant_id"))
    limit = page_limit(args.get("limit"), default=RULES_PAGE, upper=RULES_PAGE)
    after = id_cursor(args.get("cursor"))
    rows = await rules.list_rules(runtime().db, tenant(), after=after, limit=limit + 1)
    page, next_cursor = cut(rows, limit, "rule_id")
    return jsonify({"rules": page, "next_cursor": next_cursor})


@rules_bp.delete("/<rule_id>")
@document_querystring(TenantRequiredQuery)
@openapi.answers(204, "Deleted, with its active alerts closed; the body is empty.")
@openapi.errors(*openapi.TENANT_WRITE, UNKNOWN_RULE)
async def delete_rule(rule_id: str) -> Response:
    """Delete a rule (tenant-admin)."""
    parsed = _id(rule_id)
    deleted = parsed is not None and await rules.delete_rule(
        runtime().db, tenant(), parsed, principal().subject
    )
    if not deleted:
        raise ApiError(UNKNOWN_RULE, f"There is no rule {shown_name(rule_id)} in this tenant.")
    return Response(status=204)


# -- parameters ----------------------------------------------------------------


def _id(raw: str) -> int | None:
    """A row id from a URL; None for anything that cannot be one (then: not found)."""
    return positive(raw)
