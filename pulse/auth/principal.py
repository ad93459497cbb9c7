"""Who is calling: what a verified token says, in Pulse's terms."""

from __future__ import annotations

import dataclasses
from datetime import datetime

CUSTOMER = "customer"
TENANT_ADMIN = "tenant-admin"
OPERATOR = "operator"
OPERATOR_ADMIN = "operator-admin"
KNOWN_ROLES = frozenset({CUSTOMER, TENANT_ADMIN, OPERATOR, OPERATOR_ADMIN})
OPERATOR_ROLES = frozenset({OPERATOR, OPERATOR_ADMIN})
ADMIN_ROLES = frozenset({TENANT_ADMIN, OPERATOR_ADMIN})


@dataclasses.dataclass(frozen=True)
class Principal:
    subject: str
    tenant_id: str | None  # None for operators, who have no tenant of their own
    roles: frozenset[str]
    expires_at: datetime

    @property
    def is_operator(self) -> bool:
        return bool(self.roles & OPERATOR_ROLES)

    @property
    def is_admin(self) -> bool:
        return bool(self.roles & ADMIN_ROLES)
