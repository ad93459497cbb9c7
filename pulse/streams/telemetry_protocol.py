"""The telemetry WebSocket's protocol (CONTRACT 5.1), without I/O.

What a client's message does to a connection's filters, and the reply to it;
the handler (``pulse.web.telemetry_ws``) carries it out.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pulse.bus.subscription import Filters
from pulse.streams.messages import BadMessage, action_of, name_list

ACTIONS = ("subscribe", "unsubscribe", "set_metrics", "clear_filters", "auth", "ping")


@dataclasses.dataclass(frozen=True)
class Reauthenticate:
    """An ``auth`` action: the token has to be verified before there is a reply."""

    token: str


def handle_action(
    filters: Filters, message: dict[str, Any], *, max_device_filters: int
) -> tuple[Filters, dict[str, Any]] | Reauthenticate:
    """The filters after ``message`` and the reply to it; BadMessage for anything else."""
    action = action_of(message, ACTIONS)
    if action == "ping":
        return filters, {"type": "pong"}
    if action == "clear_filters":
        return Filters(), {"type": "filters_cleared"}
    if action == "auth":
        token = message.get("token")
        if not isinstance(token, str) or not token:
            raise BadMessage("auth needs token: a JWT for the same tenant.")
        return Reauthenticate(token)
    if action == "set_metrics":
        if not isinstance(message.get("metrics"), list):
            raise BadMessage("set_metrics needs metrics: a list of metric names, [] for all.")
        metrics = name_list(message, "metrics", what="metric name")
        updated = dataclasses.replace(filters, metrics=frozenset(metrics) or None)
        return updated, {"type": "metrics_updated", "metrics": metrics}
    device_ids = name_list(message, "device_ids", single="device_id", what="device id")
    if not device_ids:
        raise BadMessage(f"{action} needs device_id or device_ids.")
    current = filters.device_ids
    if action == "subscribe":
        # From "every device", subscribing narrows the stream to the devices named.
        wanted = (current or frozenset()).union(device_ids)
        if len(wanted) > max_device_filters:
            raise BadMessage(
                f"At most {max_device_filters} device ids can be filtered on one connection."
            )
        return dataclasses.replace(filters, device_ids=wanted), {
            "type": "subscribed",
            "device_ids": device_ids,
        }
    if current is None:
        raise BadMessage(
            "This connection streams every device: subscribe to devices by id first "
            "(unsubscribing cannot mean every device but some)."
        )
    # Removing the last device leaves an empty set: no device, not every device.
    return dataclasses.replace(filters, device_ids=current.difference(device_ids)), {
        "type": "unsubscribed",
        "device_ids": device_ids,
    }


def connected_message(tenant_id: str, filters: Filters, newest_id: int) -> dict[str, Any]:
    return {
        "type": "connected",
        "tenant_id": tenant_id,
        "filters": {
            "device_ids": sorted(filters.device_ids or ()),
            "metrics": sorted(filters.metrics or ()),
        },
        "last_event_id": newest_id,
    }
