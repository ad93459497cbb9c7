"""/docs in headless Chromium against a real server: it renders from this server alone
(every other request is refused and counted), breaks none of its own Content-Security-Policy,
and "Authorize" with a JWT makes "Try it out" work."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from pulse.web.openapi import TAGS
from tests.dashboard.browser import MISSING, artifacts_dir, chromium_installed, chromium_page
from tests.support import pulse_serve

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]

# Installed before any of the page's scripts run: the browser reports each violation
# of the page's policy as an event (the policy cannot refuse this script: Playwright
# adds it through the DevTools protocol, not the page).
WATCH_POLICY = """
window.pulseViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.pulseViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


async def test_docs_render_offline_within_their_policy(
    database_url: str, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import Route, expect

    admin = make_token(roles=("tenant-admin",))
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        httpx.AsyncClient(base_url=server.url) as http,
        chromium_page() as page,
    ):
        created = await http.post(
            "/api/v1/customer/devices",
            json={"device_id": "dev-docs"},
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert created.status_code == 201

        elsewhere: list[str] = []
        problems: list[str] = []
        sent: list[tuple[str, dict[str, str]]] = []

        async def only_this_server(route: Route) -> None:
            if route.request.url.startswith(server.url + "/"):
                await route.continue_()
            else:
                elsewhere.append(route.request.url)
                await route.abort()

        await page.route("**/*", only_this_server)
        page.on("request", lambda request: sent.append((request.url, request.headers)))
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: (
                problems.append(f"console: {message.text}") if message.type == "error" else None
            ),
        )
        await page.add_init_script(WATCH_POLICY)

        await page.goto(f"{server.url}/docs")
        await expect(page.locator(".swagger-ui .info .title")).to_contain_text("Pulse")
        sections = page.locator(".opblock-tag-section .opblock-tag")
        await expect(sections).to_have_count(len(TAGS))
        shown = [name.strip() for name in await sections.locator("> a span").all_inner_texts()]
        assert shown == [tag["name"] for tag in TAGS]

        # Authorize with the JWT, then call the API from the page.
        await page.click(".auth-wrapper .authorize")
        dialog = page.locator(".dialog-ux .modal-ux")
        await expect(dialog).to_contain_text("X-Provision-Token")
        bearer = dialog.locator(".auth-container", has_text="bearer")
        await bearer.locator("input").fill(admin)
        await bearer.locator("button.authorize").click()
        await expect(bearer.get_by_role("heading", name="Authorized")).to_be_visible()
        await dialog.locator("button.close-modal").click()

        operation = page.locator("#operations-devices-get_list_devices")
        await operation.locator(".opblock-summary").click()
        await operation.locator(".try-out__btn").click()
        await operation.locator(".execute").click()
        status = operation.locator(".live-responses-table .response .response-col_status")
        await expect(status).to_have_text("200")
        await expect(operation.locator(".live-responses-table")).to_contain_text("dev-docs")

        await page.screenshot(path=str(artifacts_dir() / "apidocs.png"), full_page=False)
        violations: list[Any] = await page.evaluate("window.pulseViolations")
        with contextlib.suppress(Exception):
            await page.close()

    assert elsewhere == []
    assert violations == []
    assert problems == []
    # The list's path, with the documented default limit the page fills in.
    calls = [h for url, h in sent if urlsplit(url).path.endswith("/api/v1/customer/devices")]
    assert calls and calls[-1].get("authorization") == f"Bearer {admin}"
    assert any(url.endswith("/openapi.json") for url, _ in sent)
