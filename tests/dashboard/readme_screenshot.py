"""Take the README's dashboard screenshot from a real `pulse demo` run.

    python -m tests.dashboard.readme_screenshot [--seconds 150] [--out docs/images/dashboard.png]

Runs the demo in-process on an embedded PostgreSQL in a temporary folder, lets the
simulated fleet run long enough for alerts and quiet devices to show, then opens
the printed dashboard link in headless Chromium and saves a screenshot.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import re
import tempfile
from pathlib import Path

from pulse.config import Settings
from pulse.sim.demo import run_demo
from tests.dashboard.browser import chromium_page, wait_until
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]


async def main(seconds: float, out_path: Path, seed: int) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        out, stop = io.StringIO(), asyncio.Event()
        port = free_port()
        settings = Settings(data_dir=Path(data_dir))
        demo = asyncio.create_task(run_demo(settings, port=port, seed=seed, out=out, stop=stop))
        try:
            while "Press Ctrl-C" not in out.getvalue():
                if demo.done():
                    demo.result()
                await asyncio.sleep(0.1)
            link = re.search(r"Dashboard:\s+(\S+)", out.getvalue())
            assert link
            async with chromium_page(1440, 1000) as page:
                assert page is not None, "needs /usr/bin/chromium"
                # The page keeps ten minutes of history: open it early, shoot it late.
                await page.goto(link[1])
                await wait_until(page, "window.pulseDashboard.count > 0", timeout_s=60)
                await asyncio.sleep(seconds)
                await page.screenshot(path=str(out_path))
        finally:
            stop.set()
            await demo
    print(f"saved {out_path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "dashboard.png")
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.out, args.seed))
