"""What the dashboard says when it cannot show what it should.

An operator's token without a tenant gets the tenant field; any refusal the page
cannot mend by retrying is said in one line under the top bar; a page that could
not load the alerts never says there are none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.dashboard.browser import MISSING, chromium_installed, chromium_page
from tests.dashboard.fleet import seed_fleet
from tests.support import provision_device, pulse_serve, running_server

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]


async def answer_error(route: Any, status: int, code: str, detail: str) -> None:
    """Answer an intercepted request as the server answers an error."""
    body = json.dumps({"error": code, "detail": detail})
    await route.fulfill(status=status, content_type="application/json", body=body)


async def test_an_operator_without_a_tenant_is_asked_to_choose_one(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    operator = make_token(tenant_id=None, roles=("operator",))
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        httpx.AsyncClient(base_url=server.url) as http,
        chromium_page() as page,
    ):
        await seed_fleet(pool, http, admin, devices=8, hot=5)
        await page.goto(f"{server.url}/#token={operator}")

        # The token is kept; only the tenant is asked for, and why.
        login = page.locator("#login")
        await expect(login).to_be_visible()
        await expect(page.locator("#login-error")).to_contain_text("choose a tenant")
        await expect(page.locator("#login-token")).to_be_hidden()
        await expect(page.locator("#login-tenant")).to_be_focused()
        # Behind it, nothing the page does not know: no "No active alerts".
        assert "No active alerts" not in await page.locator("#alerts").inner_text()
        assert await page.locator("#sum-alerts").inner_text() == "\u2013"  # a dash: unknown

        # A malformed tenant id is refused with the server's reason, the field kept.
        await page.fill("#login-tenant", "not a tenant!")
        await page.click("#login-form button[type=submit]")
        await expect(page.locator("#login-error")).to_contain_text("tenant_id must be")
        await expect(page.locator("#login-tenant")).to_have_value("not a tenant!")

        await page.fill("#login-tenant", "t1")
        await page.click("#login-form button[type=submit]")
        await expect(login).to_be_hidden()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(page.locator("#alert-list .alert")).to_have_count(5)
        await expect(page.locator("#sum-alerts")).to_have_text("5")
        await expect(page.locator("#who strong")).to_have_text("t1")
        await expect(page.locator("#problem")).to_be_hidden()


async def test_a_refused_fleet_websocket_is_said_in_one_line(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    # The page's own origin is not among the allowed ones (a proxy set up wrong).
    env = {"PULSE_ALLOWED_ORIGINS": "https://dashboard.example"}
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url, env=env) as server,
        httpx.AsyncClient(base_url=server.url) as http,
        chromium_page() as page,
    ):
        await seed_fleet(pool, http, admin, devices=3, hot=1)
        await page.goto(f"{server.url}/#token={admin}")
        problem = page.locator("#problem")
        await expect(problem).to_be_visible()
        await expect(problem).to_contain_text("Fleet status and alerts refused")
        await expect(problem).to_contain_text("PULSE_ALLOWED_ORIGINS")
        connection = page.locator("#connection")
        await expect(connection).to_have_attribute("data-fleet", "offline")
        await expect(connection).to_have_attribute("data-state", "offline")
        # What the REST API gave is still shown, and the telemetry (SSE) still flows.
        await expect(page.locator("#alert-list .alert")).to_have_count(1)
        await expect(connection).to_have_attribute("data-telemetry", "live")


async def test_a_refused_telemetry_stream_is_said_with_the_servers_reason(
    database_url: str, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    detail = "Streams are switched off for this tenant."
    refusals: list[str] = []

    async def refuse(route: Any) -> None:
        refusals.append(route.request.url)
        await answer_error(route, 403, "forbidden", detail)

    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        chromium_page() as page,
    ):
        # EventSource only learns that the server said no; the page must find out why.
        await page.route("**/api/v1/customer/telemetry/stream/sse?*", refuse)
        await page.goto(f"{server.url}/#token={admin}")
        problem = page.locator("#problem")
        await expect(problem).to_have_text(f"Live telemetry refused: {detail}")
        connection = page.locator("#connection")
        await expect(connection).to_have_attribute("data-telemetry", "offline")
        await expect(connection).to_have_attribute("data-fleet", "live")
        # It asked once with its ticket and once, to learn why, with its token in a header.
        assert len(refusals) == 2
        assert "ticket=" in refusals[0] and "ticket=" not in refusals[1]


async def test_a_dashboard_that_cannot_load_says_so_and_claims_no_alerts(
    database_url: str, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))

    async def missing(route: Any) -> None:
        await answer_error(route, 404, "not_found", "No such page.")

    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        chromium_page() as page,
    ):
        await page.route("**/api/v1/customer/devices*", missing)
        await page.goto(f"{server.url}/#token={admin}")
        await expect(page.locator("#problem")).to_have_text(
            "Could not load the dashboard: No such page."
        )
        await expect(page.locator("#alerts-empty")).to_have_text("Alerts could not be loaded.")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "offline")
        await expect(page.locator("#connection-label")).to_have_text("Offline")


async def test_a_busy_server_at_load_time_is_retried_and_said_meanwhile(
    database_url: str, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    busy = True

    async def devices(route: Any) -> None:
        if busy:
            await answer_error(route, 503, "database_unavailable", "The database is unreachable.")
        else:
            await route.continue_()

    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        chromium_page() as page,
    ):
        await page.route("**/api/v1/customer/devices*", devices)
        await page.goto(f"{server.url}/#token={admin}")
        problem = page.locator("#problem")
        await expect(problem).to_have_text(
            "Could not load the dashboard: The database is unreachable. Retrying."
        )
        await expect(page.locator("#alerts-empty")).not_to_have_text("No active alerts.")
        busy = False
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(problem).to_be_hidden()
        await expect(page.locator("#alerts-empty")).to_have_text("No active alerts.")


async def test_over_the_connection_limit_the_page_says_so_and_comes_back(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """Found by an audit: over the tenant's connection limit the banner said
    "Reconnecting... Nothing is lost" and the detail "telemetry: telemetry: This tenant
    has reached its connection limit."; nothing said what the person could do."""
    from playwright.async_api import expect

    await provision_device(pool, "t1", "dev-1")
    token = make_token("t1")
    limited = dataclasses.replace(settings, max_connections_per_tenant=2)
    async with (
        running_server(limited) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
        chromium_page() as page,
    ):
        async with contextlib.AsyncExitStack() as held:
            for _ in range(2):  # the tenant's two connections, taken by others
                response = await held.enter_async_context(
                    http.stream(
                        "GET",
                        "/api/v1/customer/telemetry/stream/sse",
                        headers={"Authorization": f"Bearer {token}"},
                    )
                )
                assert response.status_code == 200
            await page.goto(f"{url}/#token={token}")
            banner = page.locator("#banner")
            await expect(banner).to_contain_text("limit of open live connections")
            await expect(banner).to_contain_text("Close Pulse tabs or windows")
            await expect(banner).not_to_contain_text("Nothing is lost")
            detail = page.locator("#connection-detail")
            await expect(detail).to_contain_text("connection limit reached")
            assert "telemetry: telemetry" not in await detail.inner_text()
        # Freed: the page comes back by itself, after the server's Retry-After.
        await expect(page.locator("#connection")).to_have_attribute(
            "data-state", "live", timeout=40_000
        )
        await expect(banner).to_be_hidden()
