"""Every time the page shows is in the viewer's time zone, with the date unless it is today.

Found by an audit: the latest events' times were UTC, as a time of day without a date
(a reading of three days ago looked like one of this morning), beside a token expiry in
local time.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from tests.dashboard.browser import MISSING, chromium_installed, chromium_page, plain
from tests.history.readings import readings_at
from tests.support import provision_device

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]

ZONE = "Asia/Kathmandu"  # UTC+5:45: neither UTC nor a whole hour from it


def clock(moment: datetime) -> str:
    """en-US's h:mm:ss AM."""
    return f"{moment.hour % 12 or 12}:{moment:%M:%S %p}"


async def test_event_times_are_local_with_a_date_unless_today(
    server: str, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    await provision_device(pool, "t1", "dev-1")
    now = datetime.now(UTC).replace(microsecond=0)
    old = now - timedelta(days=3)
    await readings_at(pool, "t1", [("dev-1", old, {"temp": 1.0}), ("dev-1", now, {"temp": 2.0})])
    local_now, local_old = (t.astimezone(ZoneInfo(ZONE)) for t in (now, old))
    year = f", {local_old.year}" if local_old.year != local_now.year else ""
    async with chromium_page(locale="en-US", timezone_id=ZONE) as page:
        await page.goto(f"{server}/#token={make_token()}")
        rows = page.locator("#event-rows tr")
        await expect(rows).to_have_count(2)
        times = [plain(t) for t in await rows.locator("td:nth-child(2)").all_inner_texts()]
        assert times == [
            clock(local_now),
            f"{local_old:%b} {local_old.day}{year}, {clock(local_old)}",
        ]
        # The exact instant, in UTC, on hover.
        titles = await rows.locator("td:nth-child(2)").evaluate_all(
            "cells => cells.map((cell) => cell.title)"
        )
        assert titles == [f"{t:%Y-%m-%dT%H:%M:%S}.000Z" for t in (now, old)]
        await expect(page.locator("thead th:nth-child(2)")).to_have_text("Device time")
