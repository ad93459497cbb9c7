"""What a card's chart draws, read from its canvas: a lone reading as a dot, and nothing
across an outage.

Found by an audit: a device with a single reading had an empty chart (a line needs two
points, and points were never drawn), and an outage was drawn as a straight line from
the last reading before it to the first after, as if the device had reported throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.dashboard.browser import MISSING, chromium_installed, chromium_page, wait_until
from tests.history.readings import readings_at
from tests.support import provision_device

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]

# How many pixels of a device's chart are drawn, between two fractions of its width.
DRAWN = """([id, from, to]) => {
  const canvas = document.querySelector(`.device[data-device-id="${id}"] .chart canvas`);
  if (!canvas) return 0;
  const { width, height } = canvas;
  const left = Math.floor(width * from);
  const right = Math.ceil(width * to);
  const data = canvas.getContext("2d").getImageData(left, 0, right - left, height).data;
  let drawn = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) drawn += 1;
  return drawn;
}"""


async def drawn(page: Any, device: str, start: float = 0.0, end: float = 1.0) -> int:
    count: int = await page.evaluate(DRAWN, [device, start, end])
    return count


async def test_a_single_reading_is_drawn(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    await provision_device(pool, "t1", "once")
    ago = datetime.now(UTC) - timedelta(minutes=10)
    await readings_at(pool, "t1", [("once", ago, {"temp": 20.0})])
    async with chromium_page() as page:
        await page.goto(f"{server}/#token={make_token()}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await wait_until(page, "window.pulseDashboard.chart('once')?.[1][0] === 20")
        for _ in range(40):  # uPlot draws on its next frame
            if await drawn(page, "once"):
                break
            await page.wait_for_timeout(50)
        assert await drawn(page, "once") > 0


async def test_an_outage_breaks_the_line(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    await provision_device(pool, "t1", "gappy")
    now = datetime.now(UTC)
    # A reading a minute for ten minutes, nothing for half an hour, then ten more.
    minutes = [*range(55, 45, -1), *range(15, 5, -1)]
    rows = [("gappy", now - timedelta(minutes=m), {"temp": 20.0 + m % 3}) for m in minutes]
    await readings_at(pool, "t1", rows)
    chart = "window.pulseDashboard.chart('gappy')"
    async with chromium_page() as page:
        await page.goto(f"{server}/#token={make_token()}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await wait_until(page, f"{chart}?.[1].filter((v) => v !== null).length === 20")
        times, values = await page.evaluate(chart)
        # One null, in the outage: uPlot draws no line across it.
        assert values.count(None) == 1, values
        gap = values.index(None)
        assert times[gap - 1] < times[gap] < times[gap + 1]
        assert times[gap + 1] - times[gap - 1] == 31 * 60

        for _ in range(40):
            if await drawn(page, "gappy"):
                break
            await page.wait_for_timeout(50)
        # Drawn on both sides; nothing in the middle of the chart (the outage's).
        assert await drawn(page, "gappy", 0.0, 0.15) > 0
        assert await drawn(page, "gappy", 0.85, 1.0) > 0
        assert await drawn(page, "gappy", 0.4, 0.6) == 0
