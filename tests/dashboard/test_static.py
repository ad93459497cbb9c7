"""The dashboard's page and files: served with the right types and headers, and all shipped."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx

import pulse.dashboard

ROOT = Path(__file__).resolve().parents[2]
STATIC = Path(pulse.dashboard.__file__).parent / "static"


async def test_the_page_is_served_with_a_strict_policy(http: httpx.AsyncClient) -> None:
    page = await http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe" not in csp
    assert page.headers["referrer-policy"] == "no-referrer"

    # Everything the page loads is served, with a type the browser will accept.
    assets = re.findall(r'(?:href|src)="(/dashboard/static/[^"]+)"', page.text)
    modules = [f"/dashboard/static/js/{name}" for name in _imports("app.js")]
    types = {".js": "javascript", ".css": "text/css"}
    for path in assets + modules:
        r = await http.get(path)
        assert r.status_code == 200, path
        assert types[Path(path).suffix] in r.headers["content-type"], path
        # Asked about again on every load: no version in their names, and a browser
        # that kept them 12 hours mixed an upgrade's modules with the release before.
        assert r.headers["cache-control"] == "no-cache", path
        assert r.headers["x-content-type-options"] == "nosniff", path
    assert len(assets) == 4
    r = await http.get("/docs/static/docs.js")
    assert r.status_code == 200 and r.headers["cache-control"] == "no-cache"


def _imports(module: str) -> set[str]:
    """The page's ES modules, following imports from ``module``."""
    found, todo = {module}, [module]
    while todo:
        source = (STATIC / "js" / todo.pop()).read_text()
        for name in re.findall(r'from "\./([\w.]+\.js)"', source):
            if name not in found:
                found.add(name)
                todo.append(name)
    return found


def test_every_static_file_ships_in_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {"pulse.client", "pulse.dashboard", "pulse.sim"} <= set(config["packages"])
    patterns = config["package-data"]["pulse.dashboard"]
    shipped = {p for pattern in patterns for p in STATIC.parent.glob(pattern)}
    on_disk = {p for p in STATIC.rglob("*") if p.is_file()}
    assert on_disk == shipped
    assert (STATIC / "vendor" / "uPlot.LICENSE").read_text().startswith("The MIT License")
