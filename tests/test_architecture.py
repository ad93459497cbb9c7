"""docs/architecture.md stays true: every file:function it names exists, and every package
of pulse/ has its row."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
DOC = (ROOT / "docs" / "architecture.md").read_text()


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes, and Class.method, of a module."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            names.update(
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            )
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
    # Classes defined inside functions (the serving tunings' subclasses).
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            names.update(
                f"{node.name}.{item.name}"
                for item in node.body
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            )
    return names


def test_every_function_the_walkthrough_names_exists() -> None:
    references = re.findall(r"`(pulse/[a-z_/]+\.py):([A-Za-z_][A-Za-z_.]*)`", DOC)
    assert len(references) > 20
    for path, name in references:
        assert (ROOT / path).exists(), path
        assert name in defined_names(ROOT / path), f"{path}:{name}"


def test_every_file_the_doc_names_exists() -> None:
    for path in re.findall(r"`((?:pulse|migrations|tests)/[a-z0-9_/]+\.(?:py|sql))`", DOC):
        assert (ROOT / path).exists(), path


def test_every_package_has_its_row() -> None:
    packages = sorted(p.name for p in (ROOT / "pulse").iterdir() if (p / "__init__.py").exists())
    for package in packages:
        assert f"`{package}/`" in DOC, package


def test_the_client_row_names_each_of_its_modules() -> None:
    """From the first-ten-minutes audit: the row named half of client/'s modules, and put
    the streams in client.py."""
    row = next(line for line in DOC.splitlines() if line.startswith("| 3 | `client/` |"))
    for module in sorted((ROOT / "pulse" / "client").glob("*.py")):
        assert module.name == "__init__.py" or f"`{module.name}`" in row, module.name
