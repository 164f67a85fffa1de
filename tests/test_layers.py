"""The layers contract: data flows cli -> ops -> catalog / store / hub -> lowrank / router."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "libstore"

# layer -> libstore sub-packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "lowrank": {"types", "errors", "canonical"},
    "router": {"types", "errors", "canonical", "lowrank"},
    "store": {"types", "errors", "canonical", "config"},
    "catalog": {"types", "errors", "canonical", "config"},
    "hub": {"types", "errors", "canonical", "config", "store"},
    "ops": {"types", "errors", "canonical", "config", "catalog", "store", "hub", "lowrank", "router"},
    "cli": {"types", "errors", "canonical", "config", "library", "cli", "ops", "catalog"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "libstore" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports(layer: str) -> None:
    bad = {}
    for path in sorted((PKG / layer).rglob("*.py")):
        extra = _imports(path) - ALLOWED[layer] - {layer}
        if extra:
            bad[str(path.relative_to(PKG))] = sorted(extra)
    assert bad == {}, f"layer {layer!r} imports beyond its contract: {bad}"


def test_math_layers_are_free_of_sql_and_hub() -> None:
    for layer in ("lowrank", "router"):
        for path in (PKG / layer).rglob("*.py"):
            text = path.read_text()
            assert "sqlalchemy" not in text and "huggingface_hub" not in text, path
