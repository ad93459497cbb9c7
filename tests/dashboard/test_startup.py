"""The dashboard goes live before the charts' histories have loaded, loads them a few
at a time, and never gives a history up while the server is only busy.

Found by an audit: the live stream opened only once every device's history had been
answered (2,001 devices: 30 s of "Connecting"), six at a time (every history slot of
the tenant, so that a second tab got 429s), and a history refused six times while the
tenant's history reads were taken stayed away for good, its Retry-After ignored.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from pulse.config import Settings
from tests.dashboard.browser import MISSING, chromium_installed, chromium_page, wait_until
from tests.history.readings import readings_at
from tests.support import insert_readings, provision_device, running_server

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]

HISTORIES = "**/api/v1/customer/devices/*/telemetry?*"
# The devices whose history the page has (its `history` has a `skipped` count too).
LOADED = "Object.keys(window.pulseDashboard.history).filter((k) => k !== 'skipped').length"


async def test_the_stream_is_live_before_the_histories_and_meets_them(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    devices = [f"dev-{n}" for n in range(8)]
    for device in devices:
        await provision_device(pool, "t1", device)
    now = datetime.now(UTC)
    await readings_at(
        pool, "t1", [(d, now - timedelta(minutes=20), {"temp": 20.0}) for d in devices]
    )
    release = asyncio.Event()
    in_flight = 0
    most = 0

    async def held(route: Any) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await release.wait()
        in_flight -= 1
        await route.continue_()

    async with running_server(settings) as url, chromium_page() as page:
        await page.route(HISTORIES, held)
        await page.goto(f"{url}/#token={make_token('t1')}")
        # Live while every history is held: a reading now shows at once.
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await wait_until(
            page, f"document.querySelectorAll('#device-grid .device').length === {len(devices)}"
        )
        await insert_readings(pool, "t1", [("dev-3", {"temp": 30.5})])
        card = page.locator('.device[data-device-id="dev-3"]')
        await expect(card.locator('.metric[data-metric="temp"] .value')).to_have_text("30.5")
        newest = await pool.fetchval("SELECT max(id) FROM telemetry")
        await wait_until(page, f"window.pulseDashboard.ids.at(-1) === {newest}")
        assert await page.evaluate(LOADED) == 0
        # A few at a time: half the tenant's six history slots, not all of them.
        assert 1 <= most <= 3, most

        # Then the histories: each device's reading of 20 minutes ago, and dev-3's live
        # one after its seam, once.
        await insert_readings(pool, "t1", [("dev-3", {"temp": 31.5})])
        newest = await pool.fetchval("SELECT max(id) FROM telemetry")
        await wait_until(page, f"window.pulseDashboard.ids.at(-1) === {newest}")
        release.set()
        await wait_until(page, f"{LOADED} === {len(devices)}")
        history = await page.evaluate("window.pulseDashboard.history")
        rows = await pool.fetch("SELECT id, device_id FROM telemetry ORDER BY id")
        for device in devices:
            mine = [r["id"] for r in rows if r["device_id"] == device]
            assert history[device]["readings"] == len(
                [i for i in mine if i <= history[device]["seam"]]
            )
        points = await page.evaluate("window.pulseDashboard.points")
        assert points["dev-3"] == 3, points  # 20 minutes ago, and the two live readings
        assert points["dev-0"] == 1, points
        assert await page.evaluate("window.pulseDashboard.duplicates") == 0
        assert most <= 3, most


async def test_a_busy_history_is_asked_again_after_its_retry_after_until_it_comes(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    for device in ("dev-1", "dev-2"):
        await provision_device(pool, "t1", device)
    now = datetime.now(UTC)
    await readings_at(pool, "t1", [("dev-1", now - timedelta(minutes=5), {"temp": 20.0})])
    refusals = 7  # more than the six asks the page used to give up after
    asked: list[float] = []

    async def busy(route: Any) -> None:
        if "/devices/dev-1/" in route.request.url and len(asked) < refusals:
            asked.append(time.monotonic())
            body = '{"error": "history_limit", "detail": "Too many history reads at once."}'
            await route.fulfill(
                status=429, content_type="application/json", body=body, headers={"Retry-After": "1"}
            )
        else:
            await route.continue_()

    async with running_server(settings) as url, chromium_page() as page:
        await page.route(HISTORIES, busy)
        await page.goto(f"{url}/#token={make_token('t1')}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await wait_until(page, "window.pulseDashboard.history['dev-1'] !== undefined", timeout_s=90)
        history = await page.evaluate("window.pulseDashboard.history")
        assert history["dev-1"]["readings"] == 1
        assert len(asked) == refusals
        # Never sooner than the server asked.
        gaps = [b - a for a, b in itertools.pairwise(asked)]
        assert min(gaps) >= 0.95, gaps
        await expect(page.locator("#problem")).to_be_hidden()
