"""The page's layout on a phone and on a desktop, and what its top bar says.

Geometry is read from the rendered page (getBoundingClientRect), with a fleet of
25 devices and 5 active alerts, as in `pulse demo`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.dashboard.browser import (
    MISSING,
    chromium_installed,
    chromium_page,
    plain,
    wait_until,
)
from tests.dashboard.fleet import seed_fleet
from tests.support import ServeProcess, pulse_serve

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]

BOX = "(selector) => { const r = document.querySelector(selector).getBoundingClientRect(); \
return {left: r.left, right: r.right, top: r.top, bottom: r.bottom, height: r.height}; }"


@pytest.fixture
async def fleet_server(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> AsyncIterator[tuple[ServeProcess, str]]:
    """A server whose tenant t1 has 25 devices and 5 active alerts; and a link to its page."""
    admin = make_token(roles=("tenant-admin",))
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        await seed_fleet(pool, http, admin, devices=25, hot=5)
        yield server, f"{server.url}/#token={admin}"


async def open_fleet(page: Any, link: str) -> None:
    """The page, with every device, alert and event of the fleet rendered."""
    from playwright.async_api import expect

    await page.goto(link)
    await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    await expect(page.locator(".device")).to_have_count(25)
    await expect(page.locator("#alert-list .alert")).to_have_count(5)
    # Charts and values from the history API; the table of the last 15 events.
    await wait_until(page, "window.pulseDashboard.count === 15")
    await expect(page.locator("#event-rows tr")).to_have_count(15)


async def box(page: Any, selector: str) -> dict[str, float]:
    result: dict[str, float] = await page.evaluate(BOX, selector)
    return result


async def test_on_a_phone_nothing_is_cut_off_and_the_alerts_come_first(
    fleet_server: tuple[ServeProcess, str],
) -> None:
    _, link = fleet_server
    async with chromium_page(390, 844) as page:
        await open_fleet(page, link)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page is {width} px wide: it scrolls sideways"

        # A compact top bar (two lines), with Sign out whole and on top.
        topbar = await box(page, ".topbar")
        assert topbar["height"] <= 80, topbar
        signout = await box(page, "#signout")
        assert signout["left"] >= 0 and signout["right"] <= 390, signout
        assert signout["top"] >= 0 and signout["bottom"] <= topbar["bottom"], signout
        assert await page.evaluate(
            "(() => { const b = document.getElementById('signout').getBoundingClientRect();"
            " return document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2)"
            " === document.getElementById('signout'); })()"
        )

        # The alerts are above the fleet, the first one on the first screen.
        alerts, devices = await box(page, ".alerts"), await box(page, ".devices")
        assert alerts["bottom"] <= devices["top"], (alerts, devices)
        first_alert = await box(page, "#alert-list .alert")
        assert first_alert["bottom"] <= 844, first_alert

        # The five numbers in one row.
        stats = [await box(page, f".stat:nth-child({n})") for n in range(1, 6)]
        assert len({s["top"] for s in stats}) == 1, stats
        assert stats[-1]["right"] <= 390


async def test_on_a_desktop_the_alerts_stand_beside_the_fleet(
    fleet_server: tuple[ServeProcess, str],
) -> None:
    _, link = fleet_server
    async with chromium_page(1440, 1000) as page:
        await open_fleet(page, link)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 1440
        topbar = await box(page, ".topbar")
        assert topbar["height"] <= 60, topbar  # one line
        alerts, devices = await box(page, ".alerts"), await box(page, ".devices")
        assert alerts["left"] >= devices["right"] and alerts["top"] == devices["top"]
        # Three device cards to a row, as in the README's screenshot.
        tops = await page.evaluate(
            "[...document.querySelectorAll('.device')].slice(0, 4)"
            ".map((card) => card.getBoundingClientRect().top)"
        )
        assert tops[0] == tops[1] == tops[2] < tops[3]


def noon_zone() -> tuple[str, timezone]:
    """A time zone where it is now about noon: a token's "today" is then certain."""
    offset = 12 - datetime.now(UTC).hour  # -11..12
    name = "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"  # the POSIX sign is inverted
    return name, timezone(timedelta(hours=offset))


@pytest.mark.parametrize(
    ("lifetime", "today"), [(timedelta(days=3), False), (timedelta(hours=1), True)]
)
async def test_the_token_expiry_has_a_date_unless_it_is_today(
    server: str, make_token: Callable[..., str], lifetime: timedelta, today: bool
) -> None:
    from playwright.async_api import expect

    zone_name, zone = noon_zone()
    now = datetime.now(zone)
    expires = (now + lifetime).replace(second=0, microsecond=0)
    token = make_token(roles=("tenant-admin",), exp=int(expires.timestamp()))
    async with chromium_page(locale="en-US", timezone_id=zone_name) as page:
        await page.goto(f"{server}/#token={token}")
        who = page.locator("#who")
        await expect(who).to_contain_text("token until")
        text = "token until" + plain(await who.inner_text()).split("token until")[1]
    time = f"{expires.hour % 12 or 12}:{expires:%M} {expires:%p}"
    if today:
        assert text == f"token until {time}"
    elif expires.year == now.year:
        assert text == f"token until {expires:%b} {expires.day}, {time}"
    else:
        assert text == f"token until {expires:%b} {expires.day}, {expires.year}, {time}"
