"""The dashboard opens its charts with history, then goes on live with no gap and no
duplicate at the seam, while readings keep committing; the range picker reloads it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from pulse.config import Settings
from tests.dashboard.browser import MISSING, chromium_installed, chromium_page, wait_until
from tests.history.readings import readings_at
from tests.support import insert_readings, provision_device, running_server

pytestmark = pytest.mark.timeout(150)

DEVICES = ("dev-1", "dev-2", "dev-3")


async def writer(pool: asyncpg.Pool, stop: asyncio.Event) -> None:
    rng = random.Random(5)
    while not stop.is_set():
        rows = [(rng.choice(DEVICES), {"temp": round(rng.uniform(18, 26), 2)}) for _ in range(3)]
        await insert_readings(pool, "t1", rows)
        await asyncio.sleep(0.02)


async def test_history_then_live_at_the_seam(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    if not chromium_installed():
        pytest.skip(MISSING)
    from playwright.async_api import expect

    for device in DEVICES:
        await provision_device(pool, "t1", device)
    now = datetime.now(UTC)
    await readings_at(pool, "t1", [("dev-1", now - timedelta(hours=5), {"temp": 1.0})] * 10)
    await readings_at(
        pool,
        "t1",
        [(DEVICES[i % 3], now - timedelta(minutes=50 - i), {"temp": float(i)}) for i in range(30)],
    )
    stop = asyncio.Event()
    async with running_server(settings) as url, chromium_page() as page:
        writing = asyncio.create_task(writer(pool, stop))
        try:
            await page.goto(url)
            await page.fill("#login-token", make_token("t1"))
            await page.click("#login-form button[type=submit]")
            await page.wait_for_selector("#connection[data-state=live]", timeout=20_000)
            await wait_until(page, "window.pulseDashboard.count > 30")
        finally:
            stop.set()
            await writing
        newest = await pool.fetchval("SELECT max(id) FROM telemetry")
        await wait_until(page, f"window.pulseDashboard.lastEventId === {newest}")
        await wait_until(page, f"window.pulseDashboard.ids.at(-1) === {newest}")

        history = await page.evaluate("window.pulseDashboard.history")
        ids = await page.evaluate("window.pulseDashboard.ids")
        rows = await pool.fetch(
            """SELECT id, device_id FROM telemetry
                WHERE device_time > now() - interval '2 hours' ORDER BY id"""
        )
        seam = {d: history[d]["seam"] for d in DEVICES}
        # Each reading of the hour once: in its device's history, or live after it.
        for device in DEVICES:
            mine = [r["id"] for r in rows if r["device_id"] == device]
            assert history[device]["readings"] == len([i for i in mine if i <= seam[device]])
        # After the seam, the stream's events; before it, a few for the table only.
        device_of = {r["id"]: r["device_id"] for r in rows}
        assert [i for i in ids if i > seam[device_of[i]]] == [
            r["id"] for r in rows if r["id"] > seam[r["device_id"]]
        ]
        assert len(ids) == len(set(ids))
        assert await page.evaluate("window.pulseDashboard.duplicates") == 0
        # The cards show the charts' metric and a value.
        card = page.locator('.device[data-device-id="dev-1"]')
        await expect(card.locator('.metric[data-metric="temp"] .value')).not_to_have_text("\u2013")

        # 24 h: dev-1's readings of five hours ago are in its history now.
        assert await page.locator("#chart-range option").all_inner_texts() == [
            "10 min", "1 h", "24 h", "7 d",
        ]  # fmt: skip
        await page.select_option("#chart-range", "86400")
        dev1 = await pool.fetchval("SELECT count(*) FROM telemetry WHERE device_id = 'dev-1'")
        await wait_until(
            page, f"window.pulseDashboard.history['dev-1'].readings === {dev1}", timeout_s=20
        )
        assert await page.evaluate("window.pulseDashboard.range") == 86400


async def test_a_history_the_server_could_not_answer_is_asked_again(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """A restart or a busy moment at the page's start answered a device's history
    with a 503 once: its chart stayed without history for good, and when every device
    failed the stream started at "now", missing what came before it."""
    if not chromium_installed():
        pytest.skip(MISSING)
    from playwright.async_api import expect

    for device in DEVICES:
        await provision_device(pool, "t1", device)
    now = datetime.now(UTC)
    rows = [(d, now - timedelta(minutes=30 - i), {"temp": 20.0}) for i, d in enumerate(DEVICES)]
    await readings_at(pool, "t1", rows)
    refused: list[str] = []

    async def busy_twice(route: Any) -> None:
        if len(refused) < 2 * len(DEVICES):
            refused.append(route.request.url)
            body = '{"error": "database_unavailable", "detail": "The database is unavailable."}'
            await route.fulfill(status=503, content_type="application/json", body=body)
        else:
            await route.continue_()

    async with running_server(settings) as url, chromium_page() as page:
        await page.route("**/api/v1/customer/devices/*/telemetry?*", busy_twice)
        await page.goto(f"{url}/#token={make_token('t1')}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await wait_until(page, "Object.keys(window.pulseDashboard.history).length === 4")
        history = await page.evaluate("window.pulseDashboard.history")
        assert all(history[d]["readings"] == 1 for d in DEVICES), history
        assert len(refused) == 2 * len(DEVICES)
        await expect(page.locator("#problem")).to_be_hidden()


async def test_events_the_server_no_longer_keeps_are_said_to_be_gone(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """Found by an audit: a stream told `history_trimmed` (its position older than the
    retained events) skipped to the earliest one kept while the page said nothing, and
    its banner had said "Nothing is lost"."""
    if not chromium_installed():
        pytest.skip(MISSING)
    from playwright.async_api import expect

    await provision_device(pool, "t1", "dev-1")
    ids = await insert_readings(pool, "t1", [("dev-1", {"temp": float(n)}) for n in range(30)])
    # Retention dropped the oldest 25 (as it drops a day's partition): the page starts 15
    # events before the newest, where nothing is kept any more.
    await pool.execute("DELETE FROM telemetry WHERE tenant_id = 't1' AND id <= $1", ids[24])
    first, last = ids[-1] - 15 + 1, ids[24]
    async with running_server(settings) as url, chromium_page() as page:
        await page.goto(f"{url}/#token={make_token('t1')}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        problem = page.locator("#problem")
        await expect(problem).to_contain_text(f"Events #{first} to #{last} are not shown")
        await expect(problem).to_contain_text(f"goes on from #{last + 1}")
        # And it does.
        [newest] = await insert_readings(pool, "t1", [("dev-1", {"temp": 40.0})])
        await wait_until(page, f"window.pulseDashboard.ids.at(-1) === {newest}")
        assert await page.evaluate("window.pulseDashboard.ids") == [*ids[25:], newest]
