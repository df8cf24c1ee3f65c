"""Dependencies point one way: data/ and tasks/ (below training/) never import training/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rspo_mega"


def _imported(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("lower", ["data", "tasks"])
def test_lower_packages_do_not_import_training(lower):
    files = sorted((PACKAGE / lower).rglob("*.py"))
    assert files, lower
    upward = {f"{p.relative_to(PACKAGE.parent)}: {name}" for p in files for name in _imported(p)
              if name == "rspo_mega.training" or name.startswith("rspo_mega.training.")}
    assert not upward, sorted(upward)


@pytest.mark.parametrize("package, allowed", [
    ("config", {"config", "errors"}),  # the bottom layer: the setup step reads files for it
    ("data", {"data", "config", "errors"}),  # below tasks: prompt encoding lives in tasks
])
def test_low_packages_import_only_below_them(package, allowed):
    files = sorted((PACKAGE / package).rglob("*.py"))
    upward = {f"{p.relative_to(PACKAGE.parent)}: {name}" for p in files for name in _imported(p)
              if name.startswith("rspo_mega.") and name.split(".")[1] not in allowed}
    assert not upward, sorted(upward)
