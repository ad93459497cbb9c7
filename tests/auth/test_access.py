from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pulse.auth.access import require_roles, require_write, tenant_for
from pulse.auth.principal import ADMIN_ROLES, Principal
from pulse.errors import ApiError

LATER = datetime(2100, 1, 1, tzinfo=UTC)


def principal(tenant_id: str | None, *roles: str) -> Principal:
    return Principal("someone", tenant_id, frozenset(roles), LATER)


CUSTOMER = principal("t1", "customer")
OPERATOR = principal(None, "operator")


@pytest.mark.parametrize("requested", [None, "", "t1"])
def test_a_tenant_member_acts_on_its_own_tenant(requested: str | None) -> None:
    assert tenant_for(CUSTOMER, requested) == "t1"


def test_a_tenant_member_cannot_name_another_tenant() -> None:
    with pytest.raises(ApiError) as info:
        tenant_for(CUSTOMER, "t2")
    assert info.value.code == "forbidden"


@pytest.mark.parametrize("role", ["operator", "operator-admin"])
def test_an_operator_names_any_tenant(role: str) -> None:
    assert tenant_for(principal(None, role), "t2") == "t2"


@pytest.mark.parametrize("requested", [None, ""])
def test_an_operator_must_name_a_tenant(requested: str | None) -> None:
    with pytest.raises(ApiError) as info:
        tenant_for(OPERATOR, requested)
    assert info.value.code == "tenant_required"
    assert "tenant_id" in info.value.detail


# "." and "..": a device made in such a tenant could post nothing (review 4, 8 December).
@pytest.mark.parametrize("requested", ["has space", "x" * 65, "t1/../t2", "ü", ".", ".."])
@pytest.mark.parametrize("who", [CUSTOMER, OPERATOR])
def test_an_invalid_tenant_id_is_a_bad_request(who: Principal, requested: str) -> None:
    with pytest.raises(ApiError) as info:
        tenant_for(who, requested)
    assert info.value.code == "invalid_tenant_id"


def test_a_non_operator_without_tenant_is_forbidden() -> None:
    with pytest.raises(ApiError):
        tenant_for(principal(None, "customer"), "t1")


def test_require_roles() -> None:
    require_roles(principal("t1", "tenant-admin"), ADMIN_ROLES)
    require_roles(principal(None, "operator-admin"), ADMIN_ROLES)
    for reader in (CUSTOMER, OPERATOR):
        with pytest.raises(ApiError) as info:
            require_roles(reader, ADMIN_ROLES)
        assert "operator-admin" in info.value.detail


def test_a_tenant_admin_changes_only_its_own_tenant_whatever_roles_come_with_it() -> None:
    """From the security audit (HIGH): a token with operator (names any tenant) and
    tenant-admin (of its own) could change every tenant."""
    require_write(principal("t1", "tenant-admin"), "t1")
    require_write(principal("t1", "operator", "tenant-admin"), "t1")
    require_write(principal(None, "operator-admin"), "t2")
    require_write(principal("t1", "operator-admin"), "t2")
    for who in (
        principal("t1", "operator", "tenant-admin"),
        principal("t1", "tenant-admin", "customer"),
        principal(None, "operator", "tenant-admin"),
        principal("t1", "operator"),
        CUSTOMER,
    ):
        with pytest.raises(ApiError) as info:
            require_write(who, "t2")
        assert info.value.code == "forbidden" and "operator-admin" in info.value.detail
