"""Headless Chromium for tests: Debian's `chromium` package driven by Playwright.

Never a downloaded browser: `executable_path` points at /usr/bin/chromium, which
`.ci/run` installs with apt-get. Without it, ``chromium_page`` yields None.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MISSING = "Debian's chromium (/usr/bin/chromium) is not installed; .ci/run installs it"
# How long Playwright's expectations and actions wait: generous, for busy 2-core machines.
WAIT_MS = 20_000


def chromium_installed() -> bool:
    return CHROMIUM.exists()


def artifacts_dir() -> Path:
    default = Path(__file__).resolve().parents[2] / "artifacts"
    path = Path(os.environ.get("PULSE_TEST_ARTIFACTS") or default)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.asynccontextmanager
async def chromium_page(
    width: int = 1440, height: int = 1000, **options: Any
) -> AsyncIterator[Any]:
    """A fresh page in a fresh browser, or None when Chromium is not installed.

    ``options`` go to ``Browser.new_page`` (``locale``, ``timezone_id``...).
    """
    if not chromium_installed():
        yield None
        return
    from playwright.async_api import async_playwright, expect

    expect.set_options(timeout=WAIT_MS)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = await browser.new_page(viewport={"width": width, "height": height}, **options)
            page.set_default_timeout(WAIT_MS)
            yield page
        finally:
            await browser.close()


async def wait_until(page: Any, expression: str, timeout_s: float = 20) -> None:
    """Poll a JavaScript expression until it is truthy.

    Not ``page.wait_for_function``: that evaluates a string inside the page, which the
    dashboard's Content-Security-Policy (no eval) rightly refuses.
    """
    for _ in range(int(timeout_s / 0.05)):
        if await page.evaluate(expression):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{expression} did not become true within {timeout_s} s")


def plain(text: str) -> str:
    """Narrow and non-breaking spaces (as ICU puts before AM/PM) as plain ones."""
    return re.sub(r"[\u00a0\u202f]", " ", text)
