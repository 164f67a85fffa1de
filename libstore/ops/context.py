"""The open library handed to every operation: folder, catalog and blob store."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from libstore import config
from libstore.catalog.engine import Catalog
from libstore.catalog.migrate import ensure_current
from libstore.errors import LibraryExistsError, LibraryNotFoundError
from libstore.store.blobs import BlobStore

MARKER = "library.json"
FORMAT_VERSION = 1


@dataclass
class Context:
    """An open library. Operations take it as their first argument and own their transactions."""

    path: Path
    catalog: Catalog
    blobs: BlobStore

    def close(self) -> None:
        self.catalog.dispose()


def init_library(path: Path, db_url: str | None = None) -> Context:
    """Create the folder layout and the catalog schema (by running every migration)."""
    path = Path(path)
    if (path / MARKER).exists():
        raise LibraryExistsError(f"{path} already holds a library; open it with Library.open")
    path.mkdir(parents=True, exist_ok=True)
    (path / config.BLOBS_DIR).mkdir(exist_ok=True)
    ctx = _connect(path, db_url)
    (path / MARKER).write_text(json.dumps({"format": FORMAT_VERSION}, indent=2) + "\n")
    return ctx


def open_library(path: Path, db_url: str | None = None) -> Context:
    """Open an existing library, upgrading its catalog schema if an older libstore created it."""
    path = Path(path)
    if not (path / MARKER).exists():
        raise LibraryNotFoundError(f"no libstore library at {path}; create one with: libstore init {path}")
    return _connect(path, db_url)


def _connect(path: Path, db_url: str | None) -> Context:
    catalog = Catalog(config.db_url(path, db_url))
    ensure_current(catalog.engine)
    return Context(path=path, catalog=catalog, blobs=BlobStore(path / config.BLOBS_DIR))
