"""The layers contract: data flows cli -> library -> ops -> catalog / store / hub -> lowrank / router.

Every module of the package is scanned, absolute and relative imports alike, type-only imports too
(a ``TYPE_CHECKING`` import is still a dependency a reader has to follow). Besides the libstore
modules each layer may use, the libraries that define a layer stay inside it: SQLAlchemy, Alembic
and the ORM rows (``catalog/models.py``) in ``catalog/``, ``huggingface_hub`` in ``hub/``, boto3 in
``store/``. Nor do the rows travel through a catalog function's signature: the layers above the catalog
call no catalog function that takes or returns an ORM row (they hand in and get back the dataclasses of
``libstore.types``, or names). The CLI's torch-free commands are checked by running them
(``test_cli_*::*do_not_import_torch``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "libstore"

#: the modules every layer may use
BASE = {"types", "errors", "canonical", "config"}
# layer (sub-package, or top-level module) -> the libstore layers it may import besides itself
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "canonical": set(),
    "config": set(),
    "types": {"errors", "canonical"},
    "lowrank": {"types", "errors", "canonical"},
    "router": {"types", "errors", "canonical", "lowrank"},
    "store": BASE,
    "catalog": BASE,
    "hub": BASE | {"store"},
    "ops": BASE | {"catalog", "store", "hub", "lowrank", "router"},
    "library": BASE | {"ops", "api"},
    "api": BASE | {"ops"},
    "cli": BASE | {"library", "ops"},
    "__init__": BASE | {"library"},
}
#: layers a layer may name in type-only imports (``if TYPE_CHECKING:``) besides ``ALLOWED``: the
#: public API returns a routed model, which is the router's type
TYPE_ONLY: dict[str, set[str]] = {"library": {"router"}}
#: packages and modules that belong to one layer only: the ORM rows never leave the catalog
OWNED_BY = {
    "sqlalchemy": "catalog",
    "alembic": "catalog",
    "sqlite3": "catalog",
    "psycopg": "catalog",
    "huggingface_hub": "hub",
    "boto3": "store",
    "botocore": "store",
    "mypy_boto3_s3": "store",
    "libstore.catalog.models": "catalog",
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _type_only_nodes(tree: ast.Module) -> set[ast.AST]:
    """The import statements inside ``if TYPE_CHECKING:`` blocks."""
    found: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            found.update(n for stmt in node.body for n in ast.walk(stmt))
    return found


def imported_modules(path: Path, pkg: Path = PKG, *, type_only: bool | None = None) -> set[str]:
    """Every module ``path`` (inside package folder ``pkg``) imports, as an absolute dotted name;
    relative imports are resolved against the package ``path`` is in. ``type_only``: only the
    imports inside (``True``) or outside (``False``) ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())
    package = list(path.relative_to(pkg.parent).parent.parts)
    typing_nodes = _type_only_nodes(tree) if type_only is not None else set()
    found: set[str] = set()
    for node in ast.walk(tree):
        if type_only is not None and (node in typing_nodes) != type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{a.name}" for a in node.names)  # ``from . import repo`` is a module
    return found


def _libstore_layers(modules: set[str]) -> set[str]:
    """The libstore layers among ``modules`` (``libstore.catalog.repo`` -> ``catalog``)."""
    return {m.split(".")[1] for m in modules if m.startswith("libstore.")} & set(ALLOWED)


def _all_modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_belongs_to_a_layer() -> None:
    assert {_layer(p) for p in _all_modules()} <= set(ALLOWED)


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports(layer: str) -> None:
    bad = {}
    for path in _all_modules():
        if _layer(path) != layer:
            continue
        modules = imported_modules(path)
        allowed = ALLOWED[layer] | {layer}
        extra = (_libstore_layers(imported_modules(path, type_only=False)) - allowed) | (
            _libstore_layers(imported_modules(path, type_only=True)) - allowed - TYPE_ONLY.get(layer, set())
        )
        foreign = {
            owned
            for owned, owner in OWNED_BY.items()
            if owner != layer and any(m == owned or m.startswith(f"{owned}.") for m in modules)
        }
        if extra or foreign:
            bad[str(path.relative_to(PKG))] = sorted(extra | foreign)
    assert bad == {}, f"layer {layer!r} imports beyond its contract: {bad}"


def test_relative_imports_are_resolved(tmp_path: Path) -> None:
    """The scanner itself: relative imports from ``ops`` are seen as the modules they name."""
    module = tmp_path / "libstore" / "ops" / "experts.py"
    module.parent.mkdir(parents=True)
    module.write_text("from ..catalog import repo\nfrom . import query\nfrom .context import Context\n")
    module.write_text(module.read_text() + "if TYPE_CHECKING:\n    from ..router.model import RoutedModel\n")
    found = imported_modules(module, tmp_path / "libstore")
    assert {"libstore.catalog.repo", "libstore.ops.query", "libstore.ops.context"} <= found
    assert _libstore_layers(found) == {"catalog", "ops", "router"}
    assert _libstore_layers(imported_modules(module, tmp_path / "libstore", type_only=True)) == {"router"}


def test_math_layers_are_free_of_sql_and_hub() -> None:
    for layer in ("lowrank", "router"):
        for path in (PKG / layer).rglob("*.py"):
            text = path.read_text()
            assert "sqlalchemy" not in text and "huggingface_hub" not in text, path


#: the layers above the catalog, which hold records and names, never rows
ROW_FREE = ("ops", "cli", "library", "api", "__init__")


def row_functions(pkg: Path = PKG) -> dict[str, set[str]]:
    """``catalog module -> its functions`` whose parameters or return are annotated with an ORM row
    class (a class of ``catalog/models.py``), and every ``*_row`` function."""
    models = ast.parse((pkg / "catalog" / "models.py").read_text())
    orm = {n.name for n in models.body if isinstance(n, ast.ClassDef)}
    names = re.compile(r"\b(" + "|".join(sorted(orm)) + r")\b") if orm else None
    found: dict[str, set[str]] = {}
    for path in sorted((pkg / "catalog").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            a = node.args
            anns = [node.returns, *(x.annotation for x in [*a.posonlyargs, *a.args, *a.kwonlyargs])]
            text = " ".join(ast.unparse(x) for x in anns if x is not None)
            if node.name.endswith("_row") or (names is not None and names.search(text)):
                found.setdefault(f"{pkg.name}.catalog.{path.stem}", set()).add(node.name)
    return found


def row_calls(path: Path, pkg: Path = PKG) -> set[str]:
    """``module.function`` of the :func:`row_functions` that ``path`` names (``repo.expert_row`` after
    ``from libstore.catalog import repo``, or ``expert_row`` imported by name)."""
    rows = row_functions(pkg)
    tree = ast.parse(path.read_text())
    package = list(path.relative_to(pkg.parent).parent.parts)
    aliases: dict[str, str] = {}  # local name -> catalog module
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({a.asname: a.name for a in node.names if a.asname and a.name in rows})
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for a in node.names:
                if f"{module}.{a.name}" in rows:
                    aliases[a.asname or a.name] = f"{module}.{a.name}"
                elif a.name in rows.get(module, ()):
                    used.add(f"{module}.{a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = aliases.get(node.value.id)
            if module is not None and node.attr in rows[module]:
                used.add(f"{module}.{node.attr}")
    return used


def test_layers_above_the_catalog_hold_no_rows() -> None:
    bad = {}
    for path in _all_modules():
        if _layer(path) in ROW_FREE and (used := row_calls(path)):
            bad[str(path.relative_to(PKG))] = sorted(used)
    assert bad == {}, f"these call catalog functions that take or return ORM rows: {bad}"


def test_row_calls_are_found(tmp_path: Path) -> None:
    """The scanner itself: row-typed catalog functions are found however the module is imported."""
    catalog = tmp_path / "libstore" / "catalog"
    catalog.mkdir(parents=True)
    (catalog / "models.py").write_text("class ThingRow:\n    pass\n")
    (catalog / "things.py").write_text(
        "def thing_row(s, name): ...\n"
        "def first(s) -> ThingRow | None: ...\n"
        "def touch(s, row: ThingRow) -> None: ...\n"
        "def names(s) -> list[str]: ...\n"
    )
    assert row_functions(tmp_path / "libstore") == {
        "libstore.catalog.things": {"thing_row", "first", "touch"}
    }
    ops = tmp_path / "libstore" / "ops"
    ops.mkdir()
    (ops / "a.py").write_text("from ..catalog import things as t\nt.first(s)\nt.names(s)\n")
    (ops / "b.py").write_text("from libstore.catalog.things import touch, names\n")
    (ops / "c.py").write_text("import libstore.catalog.things as t\nt.thing_row(s, 'x')\n")
    found = {p.name: row_calls(p, tmp_path / "libstore") for p in sorted(ops.glob("*.py"))}
    assert found == {
        "a.py": {"libstore.catalog.things.first"},
        "b.py": {"libstore.catalog.things.touch"},
        "c.py": {"libstore.catalog.things.thing_row"},
    }
