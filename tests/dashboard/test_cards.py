"""What the device cards show: the filter's choice, each device's newest values, its
chart in time order, and the alert rules as they are now.

Found by an audit in a real browser: the filter hid no card (a class's `display` beat
the `hidden` attribute); a reading delivered late (a gateway's buffer, its time half an
hour old) showed as the device's current value and was charted at the end, a line drawn
back across the chart; a card's metric tiles kept the names it showed first, so that a
fifth tile stood with its first value, never updated, among the four shown; the alert
rules were read once, at load, so that a rule added while the page was open drew no
threshold and no value in red, and a deleted one kept them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from tests.dashboard.browser import MISSING, chromium_installed, chromium_page, wait_until
from tests.history.readings import readings_at
from tests.support import insert_readings, provision_device

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]


async def test_the_filter_hides_the_cards_that_do_not_match(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    for device in ("boiler-1", "boiler-2", "chiller-1", "pump-1"):
        await provision_device(pool, "t1", device)
    await pool.execute(
        "UPDATE devices SET name = 'North chiller', site_id = 'plant-b'"
        " WHERE device_id = 'chiller-1'"
    )
    await insert_readings(pool, "t1", [("pump-1", {"temp": 20.0})])
    async with chromium_page() as page:
        await page.goto(f"{server}/#token={make_token()}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        cards = page.locator("#device-grid .device")
        await expect(cards).to_have_count(4)

        def card(device: str) -> Any:
            return page.locator(f'.device[data-device-id="{device}"]')

        await page.fill("#device-filter", "boil")
        for device in ("boiler-1", "boiler-2"):
            await expect(card(device)).to_be_visible()
        for device in ("chiller-1", "pump-1"):
            await expect(card(device)).to_be_hidden()
        # The cards shown close up: the second boiler beside the first, not after gaps.
        first, second = [await card(d).bounding_box() for d in ("boiler-1", "boiler-2")]
        assert first and second and second["y"] == first["y"] and second["x"] > first["x"]

        await page.fill("#device-filter", "NORTH")  # by name, whatever the case
        await expect(card("chiller-1")).to_be_visible()
        await expect(cards.filter(visible=True)).to_have_count(1)
        await page.fill("#device-filter", "plant-b")  # by site
        await expect(cards.filter(visible=True)).to_have_count(1)
        await expect(card("chiller-1")).to_be_visible()

        await page.fill("#device-filter", "")
        await expect(cards.filter(visible=True)).to_have_count(4)


async def test_a_reading_delivered_late_is_charted_in_its_place_and_not_shown_as_latest(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    await provision_device(pool, "t1", "gateway")
    now = datetime.now(UTC)
    await readings_at(pool, "t1", [("gateway", now - timedelta(minutes=20), {"temp": 20.0})])
    chart = "window.pulseDashboard.chart('gateway')"
    async with chromium_page() as page:
        await page.goto(f"{server}/#token={make_token()}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await wait_until(page, f"{chart}?.[0].length === 1")  # its history

        (current,) = await readings_at(pool, "t1", [("gateway", now, {"temp": 22.0})])
        await wait_until(page, f"window.pulseDashboard.ids.includes({current})")
        (late,) = await readings_at(
            pool, "t1", [("gateway", now - timedelta(minutes=30), {"temp": 95.5})]
        )
        await wait_until(page, f"window.pulseDashboard.ids.includes({late})")
        await wait_until(page, f"{chart}[0].length === 3")
        times, values = await page.evaluate(chart)
        assert times == sorted(times), times
        assert values == [95.5, 20.0, 22.0], values
        value = page.locator('.device[data-device-id="gateway"] .metric[data-metric="temp"] .value')
        await expect(value).to_have_text("22.0")

        # Older than the chart's range (an hour): in the table of events, not on the chart.
        (old,) = await readings_at(
            pool, "t1", [("gateway", now - timedelta(hours=2), {"temp": 50.0})]
        )
        (newer,) = await readings_at(
            pool, "t1", [("gateway", now + timedelta(seconds=1), {"temp": 23.0})]
        )
        await wait_until(page, f"window.pulseDashboard.ids.includes({newer})")
        assert old in await page.evaluate("window.pulseDashboard.ids")
        await expect(value).to_have_text("23.0")
        await wait_until(page, f"{chart}[1].at(-1) === 23")
        times, values = await page.evaluate(chart)
        assert times == sorted(times) and len(times) == 4, times
        assert 50.0 not in values, values


async def test_a_card_shows_its_first_four_metrics_with_their_latest_values(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    await provision_device(pool, "t1", "multi")

    async def send(metrics: dict[str, float]) -> None:
        (event,) = await insert_readings(pool, "t1", [("multi", metrics)])
        await wait_until(page, f"window.pulseDashboard.ids.includes({event})")

    async with chromium_page() as page:
        tiles = page.locator('.device[data-device-id="multi"] .metric')
        await page.goto(f"{server}/#token={make_token()}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await send({"zz": 1.0})
        await expect(tiles.locator(".value")).to_have_text(["1.00"])
        await send({"aa": 10.0, "bb": 20.0, "cc": 30.0, "dd": 40.0})
        await send({"zz": 99.0})
        # Four tiles, the first four names: zz's tile, with its first value, is gone.
        await expect(tiles.locator(".name")).to_have_text(["aa", "bb", "cc", "dd"])
        await expect(tiles.locator(".value")).to_have_text(["10.0", "20.0", "30.0", "40.0"])

        # A preferred metric comes first; the last of the four makes room for it.
        await send({"temp": 21.5, "cc": 31.0})
        await expect(tiles.locator(".name")).to_have_text(["temp", "aa", "bb", "cc"])
        await expect(tiles.locator(".value")).to_have_text(["21.5", "10.0", "20.0", "31.0"])


async def test_rules_added_or_deleted_while_the_page_is_open_are_shown(
    server: str, http: httpx.AsyncClient, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    headers = {"Authorization": f"Bearer {admin}"}
    token = await provision_device(pool, "t1", "oven")

    async def send(temp: float) -> None:
        r = await http.post(
            "/ingest/v1/tenant/t1/device/oven/telemetry",
            json={"metrics": {"temp": temp}},
            headers={"X-Provision-Token": token},
        )
        assert r.status_code == 201, r.text
        await wait_until(page, f"window.pulseDashboard.ids.includes({r.json()['id']})")

    async with chromium_page() as page:
        temp = page.locator('.device[data-device-id="oven"] .metric[data-metric="temp"]')
        alerts = page.locator("#alert-list .alert")
        await page.goto(f"{server}/#token={admin}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await send(25.0)
        await expect(temp.locator(".value")).to_have_text("25.0")

        rule = {"name": "hot", "metric": "temp", "operator": ">", "threshold": 30, "severity": 4}
        r = await http.post("/api/v1/customer/alert-rules", json=rule, headers=headers)
        assert r.status_code == 201, r.text
        await send(35.0)
        await expect(alerts).to_have_count(1)
        await expect(temp.locator(".value")).to_have_text("35.0")
        await expect(temp).to_have_class(re.compile(r"\bbreach\b"))

        # Deleted: its alert closes, and the value is no longer red.
        r = await http.delete(
            f"/api/v1/customer/alert-rules/{r.json()['rule_id']}", headers=headers
        )
        assert r.status_code == 204, r.text
        await expect(alerts).to_have_count(0)
        await expect(temp).not_to_have_class(re.compile(r"\bbreach\b"))
