"""Routing never redirects, so it never echoes the Host header into a Location.

werkzeug redirected ``/api//v1/...`` (slashes merged) to an absolute URL on the
host the request named; a rule ending in ``/`` would redirect a path without it.
"""

from __future__ import annotations

import httpx
import pytest

EVIL = {"Host": "evil.example"}


@pytest.mark.parametrize("path", ["/api//v1/customer/devices", "/api/v1//telemetry/stream/status"])
async def test_a_doubled_slash_is_not_found_not_redirected(
    http: httpx.AsyncClient, path: str
) -> None:
    response = await http.get(path, headers=EVIL)
    assert response.status_code == 404, (response.status_code, response.headers)
    assert "location" not in response.headers and "evil.example" not in response.text
    assert response.json()["error"] == "not_found"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/", 200),
        ("/healthz", 200),
        # A slash at the end is another path: not found (it was served, and /docs/
        # was a page whose relative links all missed).
        ("/healthz/", 404),
        ("/docs/", 404),
        ("/api/v1/telemetry/stream/status/", 404),
        ("/api/v1/customer/devices/", 404),
    ],
)
async def test_slashes_at_the_end_never_redirect(
    http: httpx.AsyncClient, path: str, status: int
) -> None:
    response = await http.get(path, headers=EVIL)
    assert response.status_code == status, (response.status_code, response.headers)
    assert "location" not in response.headers and "evil.example" not in response.text


def test_no_rule_can_redirect() -> None:
    """Strict slashes redirect a path without the slash of a rule that ends in one: no
    rule does but the root, whose path without it is no path."""
    from pulse.app import create_app
    from pulse.config import Settings
    from tests.support import TEST_SECRET

    rules = list(create_app(Settings(jwt_secret=TEST_SECRET)).url_map.iter_rules())
    assert rules and not any(rule.merge_slashes or rule.redirect_to for rule in rules)
    assert [rule.rule for rule in rules if rule.rule.endswith("/")] == ["/"]
