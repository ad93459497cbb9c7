"""What the top bar says once a session has ended, and names for what has no visible label.

Found by an audit in a real browser: after the token expired the pill still said "Live"
behind the sign-in form; the device filter had only a placeholder for a name; every
alert's buttons were named "Acknowledge" and "Close", whichever alert they act on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import httpx
import pytest

from tests.dashboard.browser import MISSING, chromium_installed, chromium_page
from tests.dashboard.fleet import seed_fleet

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]


async def test_the_pill_says_signed_out_once_the_token_has_expired(
    server: str, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    # The token must still be good when the page is live, and expire soon after: on a
    # machine too busy to get the page live within its lifetime, a longer one is tried.
    for lifetime_s in (6, 15, 40):
        expires = int(time.time()) + lifetime_s
        token = make_token(roles=("tenant-admin",), exp=expires)
        async with chromium_page() as page:
            connection = page.locator("#connection")
            await page.goto(f"{server}/#token={token}")
            try:
                await expect(connection).to_have_attribute(
                    "data-state", "live", timeout=max(expires - time.time(), 0.1) * 1000
                )
            except AssertionError:
                if lifetime_s == 40:
                    raise
                continue  # expired before the page was live: a slow machine, not the page
            await _signs_out_then_in_again(page, make_token, expires)
            return


async def _signs_out_then_in_again(
    page: Any, make_token: Callable[..., str], expires: float
) -> None:
    from playwright.async_api import expect

    connection = page.locator("#connection")
    await expect(page.locator("#login-error")).to_contain_text(
        "expired", timeout=(max(expires - time.time(), 0) + 20) * 1000
    )
    await expect(page.locator("#login")).to_be_visible()
    await expect(connection).to_have_attribute("data-state", "signed-out")
    await expect(page.locator("#connection-label")).to_have_text("Signed out")
    await expect(page.locator("#banner")).to_be_hidden()

    # Signed in again: connecting, then live.
    await page.fill("#login-token", make_token(roles=("tenant-admin",)))
    await page.click("#login-form button[type=submit]")
    await expect(connection).to_have_attribute("data-state", "live")


async def test_the_filter_and_each_alert_button_have_a_name(
    server: str, http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    await seed_fleet(pool, http, admin, devices=3, hot=2)
    async with chromium_page() as page:
        await page.goto(f"{server}/#token={admin}")
        await expect(page.locator("#alert-list .alert")).to_have_count(2)
        await expect(page.get_by_role("searchbox", name="Filter devices")).to_be_visible()
        for device in ("dev-0001", "dev-0002"):
            for action in ("Acknowledge", "Close"):
                name = re.compile(rf"^{action} alert: .*\({device}\)$")
                await expect(page.get_by_role("button", name=name)).to_have_count(1)


async def test_the_cards_are_reached_by_tab_and_named_with_their_charts(
    server: str, http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """Found by an audit: no card could be reached from the keyboard, and a chart (a
    canvas) said nothing to a screen reader."""
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    await seed_fleet(pool, http, admin, devices=3, hot=1)
    await pool.execute("UPDATE devices SET name = 'Boiler' WHERE device_id = 'dev-0002'")
    async with chromium_page() as page:
        await page.goto(f"{server}/#token={admin}")
        first = page.get_by_role("article", name="dev-0001, online")
        await expect(first).to_be_visible()
        # From the filter, Tab goes through the cards in order.
        await page.focus("#device-filter")
        await page.keyboard.press("Tab")
        await expect(first).to_be_focused()
        await page.keyboard.press("Tab")
        await expect(page.get_by_role("article", name="Boiler (dev-0002), online")).to_be_focused()
        # Each chart says what it shows: the seed's one reading of temp.
        chart = first.get_by_role("img", name=re.compile(r"^temp over the last 1 h: 1 point, "))
        await expect(chart).to_have_count(1)
