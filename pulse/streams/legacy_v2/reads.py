"""The v2 pushes' reads, shared by the connections of a process that ask at once.

A change signals every v2 connection of the tenant in the same instant, and
each one that follows the alerts or the fleet summary would run the same
query (``pulse.db.shared``).
"""

from __future__ import annotations

from pulse.db.database import Database
from pulse.db.shared import SharedReads
from pulse.fleet.alerts import AlertJson, active_alerts
from pulse.fleet.summary import fleet_summary

ALERTS_LIMIT = 100


class FleetReads:
    def __init__(self, db: Database) -> None:
        self.alerts: SharedReads[str | None, list[AlertJson]] = SharedReads(
            lambda tenant: active_alerts(db, tenant, ALERTS_LIMIT)
        )
        self.summaries: SharedReads[str | None, dict[str, int]] = SharedReads(
            lambda tenant: fleet_summary(db, tenant)
        )
