"""The API docs page: served from the package with a strict policy, nothing from elsewhere."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import httpx

import pulse.apidocs

ROOT = Path(__file__).resolve().parents[2]
STATIC = Path(pulse.apidocs.__file__).parent / "static"


async def test_the_page_is_served_with_a_strict_policy(http: httpx.AsyncClient) -> None:
    page = await http.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = dict(
        directive.strip().split(" ", 1)
        for directive in page.headers["content-security-policy"].split(";")
    )
    assert csp["default-src"] == "'none'"
    assert csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["connect-src"] == "'self'" and csp["frame-ancestors"] == "'none'"
    assert "unsafe" not in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"

    # No inline script, and every file it loads comes from this server, with a type
    # the browser accepts under nosniff.
    assert "<script>" not in page.text and "style=" not in page.text
    assets = re.findall(r'(?:href|src)="([^"]+)"', page.text)
    loaded = [a for a in assets if a.endswith((".js", ".css"))]
    assert len(loaded) == 3
    types = {".js": "javascript", ".css": "text/css"}
    for asset in loaded:
        assert not asset.startswith(("http:", "https:", "//")), asset
        r = await http.get("/" + asset)
        assert r.status_code == 200, asset
        assert types[Path(asset).suffix] in r.headers["content-type"], asset


def test_swagger_ui_is_vendored_with_its_license() -> None:
    vendor = STATIC / "vendor"
    assert (vendor / "swagger-ui.LICENSE").read_text().lstrip().startswith("Apache License")
    assert "SmartBear" in (vendor / "swagger-ui.NOTICE").read_text()
    assert (vendor / "swagger-ui-bundle.js.LICENSE.txt").exists()
    assert "5.35.0" in (vendor / "swagger-ui.VERSION").read_text()


def test_every_static_file_ships_in_the_wheel() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "pulse.apidocs" in config["packages"]
    patterns = config["package-data"]["pulse.apidocs"]
    shipped = {p for pattern in patterns for p in STATIC.parent.glob(pattern)}
    on_disk = {p for p in STATIC.rglob("*") if p.is_file()}
    assert on_disk == shipped
