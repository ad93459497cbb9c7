"""What one tenant may create: devices and alert rules, each up to a configured number.

Every reading is judged against each of its tenant's alert rules (3,000 rules made
one tenant's batches 27 times slower and kept a database core busy), and a device
list is read whole: PULSE_MAX_RULES_PER_TENANT and PULSE_MAX_DEVICES_PER_TENANT.
"""

from __future__ import annotations

from typing import Literal

import asyncpg

from pulse.db.queries import load_queries

Q = load_queries(__package__)


class QuotaReached(Exception):
    """The tenant has as many devices (or rules) as it may."""


async def lock_quota(conn: asyncpg.Connection, tenant_id: str) -> None:
    """Taken by every creation of a device or an alert rule of the tenant before it
    inserts, held to the end of the caller's transaction: two at once cannot both take
    the last place under the quota (``check_quota``, after the insert)."""
    await conn.execute(Q["lock_tenant_quota"], tenant_id)


async def check_quota(
    conn: asyncpg.Connection, tenant_id: str, kind: Literal["devices", "rules"], limit: int
) -> None:
    """Raise QuotaReached, for the caller to roll back, when the tenant has more than
    ``limit`` devices or alert rules with the one its transaction has just made (under
    ``lock_quota``). Counted after the insert, so that a device the tenant already has,
    or a rule for a device it does not have, is refused as such, not as one too many."""
    count = await conn.fetchval(Q[f"count_{kind}"], tenant_id)
    if count > limit:
        what = "devices" if kind == "devices" else "alert rules"
        raise QuotaReached(f"The tenant has {count - 1} {what}, as many as it may ({limit}).")
