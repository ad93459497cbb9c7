"""Names the page must show like any other, and sessions that must not leak into the next.

Found by an audit in a real browser: a metric named like a built-in JavaScript property
(`constructor`, `toString`, `__proto__`) threw on every reading and dropped the other
devices' readings of the same batch; a sign-out left the session's cards on the page
(under the next tenant's header); a deleted device's card stayed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from pulse.config import Settings
from tests.dashboard.browser import MISSING, chromium_installed, chromium_page, wait_until
from tests.dashboard.fleet import seed_fleet
from tests.support import insert_readings, provision_device, pulse_serve, running_server

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not chromium_installed(), reason=MISSING),
]

BUILTINS = ("constructor", "toString", "__proto__", "hasOwnProperty")


async def test_metrics_named_like_javascript_builtins_show_like_any_other(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    tokens = {d: await provision_device(pool, "t1", d) for d in ("odd", "plain")}
    errors: list[str] = []
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        httpx.AsyncClient(base_url=server.url) as http,
        chromium_page() as page,
    ):

        async def ingest(device: str, metrics: dict[str, float]) -> int:
            r = await http.post(
                f"/ingest/v1/tenant/t1/device/{device}/telemetry",
                json={"metrics": metrics},
                headers={"X-Provision-Token": tokens[device]},
            )
            assert r.status_code == 201, r.text
            return int(r.json()["id"])

        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(f"{server.url}/#token={admin}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        ids = []
        for n in range(3):  # in the same batches as the other device's readings
            ids.append(await ingest("odd", {name: float(n) for name in BUILTINS}))
            ids.append(await ingest("plain", {"temp": 20.0 + n}))
        await wait_until(page, f"window.pulseDashboard.ids.includes({ids[-1]})")
        assert sorted(await page.evaluate("window.pulseDashboard.ids")) == ids
        plain = page.locator('.device[data-device-id="plain"]')
        await expect(plain.locator('.metric[data-metric="temp"] .value')).to_have_text("22.0")
        odd = page.locator('.device[data-device-id="odd"]')
        for name in BUILTINS[:3]:  # a card shows four metrics at most
            metric = odd.locator(f'.metric[data-metric="{name}"]')
            await expect(metric.locator(".value")).to_have_text("2.00")
            await expect(metric.locator(".unit")).to_have_text("")
        assert errors == []


async def test_a_session_leaves_nothing_behind_and_deleted_devices_go(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    from playwright.async_api import expect

    t1 = make_token(roles=("tenant-admin",))
    operator = make_token(None, roles=("operator",))
    t2 = make_token("t2", roles=("tenant-admin",))
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        httpx.AsyncClient(base_url=server.url) as http,
        chromium_page() as page,
    ):
        await seed_fleet(pool, http, t1, devices=4, hot=1)
        await seed_fleet(pool, http, t2, tenant="t2", devices=2, hot=0)
        await page.goto(f"{server.url}/#token={operator}")
        await page.fill("#login-tenant", "t1")  # asked for: an operator's token names none
        await page.click("#login-form button[type=submit]")
        cards = page.locator("#device-grid .device")
        await expect(cards).to_have_count(4)
        # The preferred metric charted, though history brings battery first.
        await expect(page.locator("#chart-metric")).to_have_value("temp")

        # Deleted: its card goes at the next refresh of the list (the summary changes).
        r = await http.delete(
            "/api/v1/customer/devices/dev-0004", headers={"Authorization": f"Bearer {t1}"}
        )
        assert r.status_code == 204
        await expect(page.locator("#sum-total")).to_have_text("3")
        await expect(cards).to_have_count(3)

        # Signed out: nothing of t1 behind the sign-in form.
        await page.click("#signout")
        await expect(page.locator("#login")).to_be_visible()
        await expect(cards).to_have_count(0)
        await expect(page.locator("#alert-list .alert")).to_have_count(0)
        await expect(page.locator("#sum-total")).to_have_text("\u2013")
        # The operator's tenant is not offered to whoever signs in next.
        await expect(page.locator("#login-tenant")).to_have_value("")

        # Another tenant's session shows its own devices only.
        await page.fill("#login-token", t2)
        await page.click("#login-form button[type=submit]")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await expect(cards).to_have_count(2)
        shown: Any = await cards.evaluate_all("nodes => nodes.map(n => n.dataset.deviceId)")
        assert shown == ["dev-0001", "dev-0002"]


async def test_more_active_alerts_than_the_socket_sends_are_said(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    """The v2 WebSocket pushes the newest 100 active alerts: with 105 the panel said
    100, while the summary said 105."""
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        httpx.AsyncClient(base_url=server.url) as http,
        chromium_page() as page,
    ):
        await seed_fleet(pool, http, admin, devices=105, hot=105)
        await page.goto(f"{server.url}/#token={admin}")
        await expect(page.locator("#sum-alerts")).to_have_text("105")
        await expect(page.locator("#alert-list .alert")).to_have_count(100)
        await expect(page.locator("#alert-count")).to_have_text("100 of 105")
        assert (await page.title()).startswith("(105) ")


async def test_a_long_range_holds_a_point_per_bucket_not_per_reading(
    database_url: str, pool: asyncpg.Pool, tmp_path: Path, make_token: Callable[..., str]
) -> None:
    """From the dashboard audit: live readings were kept a point each for the whole
    range, up to 604,800 a week per device at one a second, on a page left open."""
    from playwright.async_api import expect

    admin = make_token(roles=("tenant-admin",))
    token = await provision_device(pool, "t1", "busy")
    async with (
        pulse_serve(data_dir=tmp_path, database_url=database_url) as server,
        httpx.AsyncClient(base_url=server.url) as http,
        chromium_page() as page,
    ):
        await page.goto(f"{server.url}/#token={admin}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await page.select_option("#chart-range", "604800")  # 7 days: 15-minute buckets
        await wait_until(page, "window.pulseDashboard.history.busy?.bucket === '15m'")
        ids = []
        for n in range(30):
            r = await http.post(
                "/ingest/v1/tenant/t1/device/busy/telemetry",
                json={"metrics": {"temp": float(n)}},
                headers={"X-Provision-Token": token},
            )
            ids.append(r.json()["id"])
        await wait_until(page, f"window.pulseDashboard.ids.includes({ids[-1]})")
        points = await page.evaluate("window.pulseDashboard.points")
        assert points["busy"] <= 2, points  # 30 readings, in one bucket (two at a boundary)


async def test_a_device_flooding_new_metric_names_leaves_the_page_responsive_and_bounded(
    settings: Settings, pool: asyncpg.Pool, make_token: Callable[..., str]
) -> None:
    """Found by an audit: one device sending 199 new metric names a reading (200 are
    allowed) froze its tenant's dashboard (3.2 million DOM nodes and 20 s stalls after 6
    readings: the picker rebuilt whole for each new name, a series kept per name ever
    seen), and reloading did not help (its history: 14,130 series, 4.1 GB)."""
    from playwright.async_api import expect

    await provision_device(pool, "t1", "flood")
    await provision_device(pool, "t1", "plain")
    readings = 10
    bound = "document.getElementsByTagName('*').length"

    def reading(n: int) -> dict[str, float]:
        names = [f"s{n:03d}_{j:03d}_".ljust(64, "x") for j in range(199)]
        return {"temp": 21.0 + n, **{name: float(j) for j, name in enumerate(names)}}

    async def responsive() -> None:
        # The page answers at once, busy machine or not: a page stalled for seconds does not.
        start = time.monotonic()
        await page.evaluate("1")
        assert time.monotonic() - start < 5

    async def bounded() -> None:
        await responsive()
        # The picker lists 100 names (and says there are more), the card keeps 20 and says so.
        assert await page.locator("#chart-metric option").count() <= 101
        assert await page.evaluate("window.pulseDashboard.metrics.flood") <= 20
        assert await page.evaluate(bound) < 3000
        card = page.locator('.device[data-device-id="flood"]')
        await expect(card.locator(".more-metrics")).to_be_visible()
        await expect(card.locator('.metric[data-metric="temp"] .value')).not_to_have_text("\u2013")
        # Nothing spills: the picker keeps its width, the card and the row theirs.
        assert (await page.locator("#chart-metric").bounding_box() or {"width": 1e9})[
            "width"
        ] <= 200
        spill = await card.evaluate("(c) => c.scrollWidth - c.clientWidth")
        assert spill <= 1, spill
        row = await page.locator("#event-rows tr").first.bounding_box()
        assert row is not None and row["height"] < 80, row

    async with running_server(settings) as url, chromium_page() as page:
        await page.goto(f"{url}/#token={make_token('t1')}")
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        for n in range(readings):
            [newest] = await insert_readings(pool, "t1", [("flood", reading(n))])
            await insert_readings(pool, "t1", [("plain", {"temp": 20.0})])
            await wait_until(page, f"window.pulseDashboard.ids.includes({newest})")
            await responsive()
        await bounded()

        # Reloaded: the device's history (1,991 series) is held within the same bounds.
        await page.reload()
        await expect(page.locator("#connection")).to_have_attribute("data-state", "live")
        await wait_until(page, "window.pulseDashboard.history.flood !== undefined")
        await bounded()
        assert await page.evaluate("window.pulseDashboard.history.flood.readings") == readings
