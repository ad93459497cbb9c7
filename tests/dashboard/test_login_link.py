"""A #token= link signs a fresh tab in at once, but never replaces another tenant's
session unasked.

Found by a security audit (login CSRF): a link to `/#token=<someone's JWT>` signed the
dashboard in as the link's tenant, silently, in place of the tab's own session; what the
person did next (a device added, an alert closed) went to the sender's tenant. The
link `pulse demo` prints is the same kind of link, for a fresh tab: still one click.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from pulse.config import Settings
from tests.dashboard.browser import MISSING, chromium_installed, chromium_page, wait_until
from tests.support import provision_device, running_server

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]

STORED_TOKEN = "sessionStorage.getItem('pulse.token')"


def card(page: Any, device: str) -> Any:
    return page.locator(f'#device-grid .device[data-device-id="{device}"]')


async def test_a_link_for_another_tenant_asks_before_it_replaces_the_session(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    await provision_device(pool, "t1", "dev-a")
    await provision_device(pool, "t2", "dev-b")
    alice = make_token("t1", roles=("tenant-admin",), subject="alice")
    mallory = make_token("t2", roles=("tenant-admin",), subject="mallory")
    async with running_server(settings) as url, chromium_page() as page:
        sent: list[str] = []  # every Authorization header the page sent

        def record(request: Any) -> None:
            if "authorization" in request.headers:
                sent.append(request.headers["authorization"])

        page.on("request", record)
        question = page.locator("#switch")
        await page.goto(f"{url}/#token={alice}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(card(page, "dev-a")).to_be_visible()
        await expect(page.locator("#who")).to_contain_text("tenant t1")

        # Another tenant's link, opened in this tab (from another site: a new document).
        await page.goto("about:blank")
        await page.goto(f"{url}/#token={mallory}&tenant=t2")
        await expect(question).to_be_visible()
        await expect(page.locator("#switch-to-tenant")).to_have_text("t2")
        await expect(page.locator("#switch-to-subject")).to_have_text("mallory")
        await expect(page.locator("#switch-from-tenant")).to_have_text("t1")
        await expect(page.locator("#switch-from-subject")).to_have_text("alice")
        await expect(page.locator("#switch-stay")).to_be_focused()
        assert page.url == f"{url}/"  # the fragment is gone from the address bar
        # Behind the question, the tab is still t1's: its session, its devices, its streams.
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(card(page, "dev-a")).to_be_visible()
        await expect(page.locator("#who")).to_contain_text("tenant t1")
        assert await page.evaluate(STORED_TOKEN) == alice
        assert f"Bearer {mallory}" not in sent

        # "Stay": t1's session goes on, and the link is forgotten (a reload does not ask).
        await page.click("#switch-stay")
        await expect(question).to_be_hidden()
        assert await page.evaluate(STORED_TOKEN) == alice
        await page.reload()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(card(page, "dev-a")).to_be_visible()
        await expect(question).to_be_hidden()
        assert page.url == f"{url}/"
        assert f"Bearer {mallory}" not in sent

        # A link followed while the page is open (only the fragment changes) asks too;
        # "Switch" then signs in as t2, and nothing of t1 stays on the page.
        await page.goto(f"{url}/#token={mallory}")
        await expect(question).to_be_visible()
        await expect(page.locator("#switch-to-tenant")).to_have_text("t2")
        await wait_until(page, "window.location.hash === ''")
        assert await page.evaluate(STORED_TOKEN) == alice
        await page.click("#switch-confirm")
        await expect(question).to_be_hidden()
        await expect(card(page, "dev-b")).to_be_visible()
        await expect(card(page, "dev-a")).to_have_count(0)
        await expect(page.locator("#who")).to_contain_text("tenant t2")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        assert await page.evaluate(STORED_TOKEN) == mallory


async def test_a_link_signs_a_fresh_tab_in_at_once(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """The demo's link: no session in the tab, no question. A fresh token of the same
    tenant and subject (the demo run again) is taken without one too."""
    from playwright.async_api import expect

    await provision_device(pool, "t1", "dev-a")
    first = make_token("t1", roles=("tenant-admin",), subject="alice")
    again = make_token("t1", roles=("tenant-admin",), subject="alice", lifetime_s=7200)
    assert again != first
    async with running_server(settings) as url, chromium_page() as page:
        await page.goto(f"{url}/#token={first}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(card(page, "dev-a")).to_be_visible()
        await expect(page.locator("#who")).to_contain_text("tenant t1")
        await expect(page.locator("#switch")).to_be_hidden()
        await expect(page.locator("#login")).to_be_hidden()
        assert page.url == f"{url}/"
        assert await page.evaluate(STORED_TOKEN) == first

        await page.goto("about:blank")
        await page.goto(f"{url}/#token={again}")
        await wait_until(page, f"{STORED_TOKEN} === {again!r}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(card(page, "dev-a")).to_be_visible()
        await expect(page.locator("#switch")).to_be_hidden()
        assert page.url == f"{url}/"
