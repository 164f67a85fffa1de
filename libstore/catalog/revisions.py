"""The revision chain of the packaged migrations, read without Alembic or SQLAlchemy.

Opening a current catalog compares its version row with :func:`head_revision`; reading the chain from
the migration files' own ``revision =`` / ``down_revision =`` lines keeps that check free of
Alembic's (and SQLAlchemy's) imports, which ``ls``/``show`` cannot afford.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

from libstore.errors import SchemaError

VERSION_TABLE = "libstore_alembic_version"


def script_location() -> Path:
    """The migrations folder, whether libstore runs from a wheel or from a source checkout."""
    spec = importlib.util.find_spec("libstore.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "migrations"


_REVISION_LINE = re.compile(r"^(down_revision|revision)\s*(?::[^=]+)?=\s*(?:[\"']([^\"']+)[\"']|None)", re.M)


@functools.cache
def revisions() -> dict[str, str | None]:
    """``revision -> down_revision`` of every packaged migration, read from the files' text (the
    module-level assignments Alembic itself reads), so checking a catalog needs no Alembic."""
    chain: dict[str, str | None] = {}
    for file in sorted((script_location() / "versions").glob("*.py")):
        found = dict((m[1], m[2] or None) for m in _REVISION_LINE.finditer(file.read_text(encoding="utf-8")))
        if found.get("revision"):
            chain[str(found["revision"])] = found.get("down_revision")
    return chain


def head_revision() -> str:
    """The newest revision: the one no other revision follows."""
    chain = revisions()
    heads = sorted(set(chain) - {d for d in chain.values() if d is not None})
    assert len(heads) == 1, f"the migrations have {len(heads)} heads: {heads}"
    return heads[0]


def check_known(rev: str) -> None:
    if rev not in revisions():
        raise SchemaError(
            f"this catalog is at schema revision {rev}, which this libstore does not know: it was "
            f"written by a newer libstore. Upgrade libstore (pip install -U libstore).",
            revision=rev,
        )
