"""The device and rule lists come a page at a time: the dashboard shows every page.

The server's pages hold 1,000 (docs/fleet.md); here the browser's requests are
rewritten to ask for 2, so that a fleet of five needs three pages of devices and a
tenant's three rules two pages.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg
import httpx
import pytest

from tests.dashboard.browser import MISSING, chromium_installed, chromium_page
from tests.dashboard.fleet import seed_fleet
from tests.support import pulse_serve

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]

LISTS = re.compile(r"/api/v1/customer/(devices|alert-rules)(\?.*)?$")


async def test_every_page_of_devices_and_rules_is_shown(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    headers = {"Authorization": f"Bearer {admin}"}
    asked: list[dict[str, str]] = []

    async def pages_of_two(route: Any) -> None:
        url = urlsplit(route.request.url)
        params = dict(parse_qsl(url.query))
        asked.append({"path": url.path, **params})
        params["limit"] = "2"
        await route.continue_(url=url._replace(query=urlencode(params)).geturl())

    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        httpx.AsyncClient(base_url=server.url, headers=headers) as http,
        chromium_page() as page,
    ):
        # Two rules that never fire first: the one that marks a value is on page two.
        for n in (1, 2):
            rule = {"name": f"r{n}", "metric": "humidity", "operator": "<", "threshold": -n}
            r = await http.post("/api/v1/customer/alert-rules", json={**rule, "severity": 1})
            assert r.status_code == 201, r.text
        ids = await seed_fleet(pool, http, admin, devices=5, hot=1)

        await page.route(LISTS, pages_of_two)
        await page.goto(f"{server.url}/#token={admin}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        cards = page.locator("#device-grid .device")
        await expect(cards).to_have_count(5)
        shown: Any = await cards.evaluate_all("nodes => nodes.map(n => n.dataset.deviceId)")
        assert sorted(shown) == ids
        # The hot rule, on the rules' second page, marks dev-0001's temperature.
        temp = page.locator('.device[data-device-id="dev-0001"] .metric[data-metric="temp"]')
        await expect(temp).to_have_class(re.compile(r"\bbreach\b"))
        cool = page.locator('.device[data-device-id="dev-0002"] .metric[data-metric="temp"]')
        await expect(cool).not_to_have_class(re.compile(r"\bbreach\b"))

    devices = [a for a in asked if a["path"].endswith("/devices")]
    rules = [a for a in asked if a["path"].endswith("/alert-rules")]
    # Each walk: the first page without a cursor, then each from the last one's end.
    assert [a.get("cursor") for a in devices[:3]] == [None, "dev-0002", "dev-0004"]
    assert [a.get("cursor") for a in rules[:2]] == [None, rules[1]["cursor"]]
    assert rules[1]["cursor"] is not None and len(rules) == 2
