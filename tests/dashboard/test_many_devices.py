"""A fleet of many devices: only the cards on screen (or nearly) build a chart and ask
for their history; the others do when they are scrolled into view.

Found by an audit: with 426 devices the page built 426 charts at its first paint (a
0.8 s block of its main thread) and asked for 426 histories, three at a time (10.7 s),
most of them for cards nobody had scrolled to. With 400 devices of an hour's readings
each the longest task at load went from 651-763 ms to 60 ms, the cards on the first
screen had their charts after 0.7 s instead of 2.0 s, and 24 histories were asked for
instead of 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from pulse.config import Settings
from tests.dashboard.browser import MISSING, chromium_installed, chromium_page, wait_until
from tests.history.readings import readings_at
from tests.support import provision_device, running_server

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]

HISTORIES = "**/api/v1/customer/devices/*/telemetry?*"
DEVICES = [f"dev-{n:03d}" for n in range(90)]
# The cards within this many pixels below the screen count as near it: the page's
# margin, 200 px, and the rows that were on screen before the cards above them filled in.
NEAR_PX = 700
# Per card: its device, how far below the bottom of the screen it is, whether it has a
# chart.
CARDS = """[...document.querySelectorAll('#device-grid .device')].map((card) => [
  card.dataset.deviceId,
  card.getBoundingClientRect().top - window.innerHeight,
  card.querySelector('.chart canvas') !== null,
])"""
# Every card on screen has its history and its chart.
SHOWN = """[...document.querySelectorAll('#device-grid .device')]
  .filter((card) => card.getBoundingClientRect().top < window.innerHeight)
  .every((card) => card.querySelector('.chart canvas')
    && window.pulseDashboard.history[card.dataset.deviceId])"""


def has_history(device: str) -> str:
    return (
        f"window.pulseDashboard.history['{device}'] !== undefined"
        f" && document.querySelector('[data-device-id=\"{device}\"] .chart canvas') !== null"
    )


async def test_only_the_cards_on_screen_get_a_chart_and_a_history(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    for device in DEVICES:
        await provision_device(pool, "t1", device)
    ago = datetime.now(UTC) - timedelta(minutes=10)
    await readings_at(pool, "t1", [(d, ago, {"temp": 20.0}) for d in DEVICES])
    asked: list[str] = []

    async def counted(route: Any) -> None:
        asked.append(route.request.url.split("/devices/")[1].split("/")[0])
        await route.continue_()

    async with running_server(settings) as url, chromium_page(1440, 1000) as page:
        await page.route(HISTORIES, counted)
        await page.goto(f"{url}/#token={make_token('t1')}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(page.locator("#device-grid .device")).to_have_count(len(DEVICES))
        await wait_until(page, SHOWN)
        await asyncio.sleep(1.0)  # time enough for the rest, were they asked for

        cards = await page.evaluate(CARDS)
        near = {device for device, below, _ in cards if below < NEAR_PX}
        charted = {device for device, _, chart in cards if chart}
        assert 3 <= len(near) < len(DEVICES) / 2, near
        assert charted <= near, sorted(charted - near)
        assert set(asked) <= near, sorted(set(asked) - near)
        assert len(asked) == len(set(asked))  # each once

        # The last card, scrolled to, gets both.
        last = DEVICES[-1]
        assert last not in asked
        await page.locator(f'.device[data-device-id="{last}"]').scroll_into_view_if_needed()
        await wait_until(page, has_history(last))
        history = await page.evaluate(f"window.pulseDashboard.history['{last}']")
        assert history["readings"] == 1
        assert asked.count(last) == 1


# Every card's "seen ..." node, counting the changes made to its text from now on.
WATCH_SEEN = """(() => {
  window.seenChanges = {};
  for (const card of document.querySelectorAll('#device-grid .device')) {
    const id = card.dataset.deviceId;
    window.seenChanges[id] = 0;
    new MutationObserver((records) => { window.seenChanges[id] += records.length; })
      .observe(card.querySelector('.seen'), {childList: true, characterData: true, subtree: true});
  }
})()"""


async def test_the_clock_touches_only_the_cards_whose_seen_ago_changes(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """From a note: the dashboard's clock wrote every card's "seen ... ago" every second,
    the same text or not, and each write had the page laid out again: with thousands of
    devices, a second's work for one word that changes once a minute. It writes only the
    cards whose text changes now (one device seen just now, whose seconds count; the
    others seen half an hour ago)."""
    for device in DEVICES:
        await provision_device(pool, "t1", device)
    await pool.execute(
        "UPDATE devices SET last_seen_at = CASE WHEN device_id = $2 THEN now()"
        " WHEN device_id = $3 THEN NULL ELSE now() - interval '30 min 5 s' END"
        " WHERE tenant_id = $1",
        "t1",
        DEVICES[0],
        DEVICES[-1],  # never seen: it says so, and the clock leaves it (it wrote "seen never")
    )
    async with running_server(settings) as url, chromium_page(1440, 1000) as page:
        await page.goto(f"{url}/#token={make_token('t1')}")
        seen = "[...document.querySelectorAll('#device-grid .seen')].map((n) => n.textContent)"
        ago = f"{seen}.filter((t) => t.endsWith(' ago')).length == {len(DEVICES) - 1}"
        await wait_until(page, ago)
        await page.evaluate(WATCH_SEEN)
        # Three ticks of the clock: the device seen just now has had three new texts.
        await wait_until(page, f"window.seenChanges['{DEVICES[0]}'] >= 3")
        changes = await page.evaluate("window.seenChanges")
        assert changes.pop(DEVICES[0]) >= 3
        assert set(changes.values()) == {0}, changes
        said = await page.locator(f'.device[data-device-id="{DEVICES[1]}"] .seen').inner_text()
        assert said == "seen 30 min ago"
        never = await page.locator(f'.device[data-device-id="{DEVICES[-1]}"] .seen').inner_text()
        assert never == "never seen"
