"""The open library handed to every operation: folder, catalog and blob store.

A library folder holds ``library.json`` (``{"format": 1}``), the blob store and, by default, the
SQLite catalog. Opening reads and checks ``library.json`` first and never writes it, so a library
written by a newer libstore, or a folder that only looks like one, is refused before its catalog is
touched. Creating a library either completes or leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from libstore import config
from libstore.catalog import team
from libstore.catalog.engine import Catalog, translate_errors
from libstore.catalog.migrate import current_revision, ensure_current
from libstore.catalog.revisions import head_revision
from libstore.errors import (
    LibraryExistsError,
    LibstoreError,
    StorageError,
    ValidationError,
)
from libstore.store.backend import BlobBackend
from libstore.store.blobs import BlobStore
from libstore.store.marker import FORMAT_VERSION, MARKER, read_marker

if TYPE_CHECKING:
    from libstore.store.object_store import ObjectBlobStore


@dataclass
class Context:
    """An open library. Operations take it as their first argument and own their transactions."""

    path: Path
    catalog: Catalog
    blobs: BlobBackend
    #: Whether every blob the catalog references belongs in ``blobs``: false only for a folder library
    #: on a catalog whose blobs are another library's folder (a blob missing here is not lost).
    blobs_complete: bool = True

    def close(self) -> None:
        self.catalog.dispose()


def init_library(path: Path, db_url: str | None = None, blob_store: str | None = None) -> Context:
    """Create the folder layout and the catalog schema (by running every migration).

    ``blob_store`` (``s3://bucket/prefix``) makes it a team library: the URL is recorded in the
    catalog, and every library later opened on that catalog uses it. A catalog that already names
    another blob store is refused. All or nothing: if the folder cannot be written or the catalog
    cannot be created, whatever this call made is removed again and the error says why.
    """
    path = Path(path)
    if (path / MARKER).exists():
        raise LibraryExistsError(
            f"{path} already holds a library; open it with Library.open or libstore -L {path}", path=str(path)
        )
    if blob_store is not None:
        from libstore.store.object_store import parse_url

        parse_url(blob_store)
    catalog = Catalog(config.db_url(path, db_url))  # a bad URL or missing driver fails here, before any write
    made: list[Path] = []
    try:
        _make_dirs(path, made)
        _make_dirs(path / config.BLOBS_DIR, made)
        staged = path / f".{MARKER}.tmp-{os.getpid()}"
        made.append(staged)
        library_id = uuid.uuid4().hex
        marker = {"format": FORMAT_VERSION, "id": library_id}
        _write_file(staged, (json.dumps(marker, indent=2) + "\n").encode())
        _made_by_catalog(catalog, path, made)
        _upgrade(catalog)
        if blob_store is not None:
            _record_blob_store(catalog, blob_store)
        else:
            _claim_folder_blobs(catalog, library_id)
        os.replace(staged, path / MARKER)
    except BaseException as e:
        catalog.dispose()
        _undo(made)
        if isinstance(e, OSError) and not isinstance(e, LibstoreError):
            raise _folder_error(path, e, "create a library in") from None
        raise
    blobs, complete = _blob_backend(path, catalog, library_id)
    return Context(path, catalog, blobs, complete)


def open_library(path: Path, db_url: str | None = None) -> Context:
    """Open an existing library, upgrading its catalog schema if an older libstore created it."""
    path = Path(path)
    library_id = read_marker(path).get("id")
    catalog = Catalog(config.db_url(path, db_url))
    try:
        _upgrade(catalog)
        blobs, complete = _blob_backend(path, catalog, library_id if isinstance(library_id, str) else None)
    except BaseException:
        catalog.dispose()
        raise
    return Context(path, catalog, blobs, complete)


def _claim_folder_blobs(catalog: Catalog, library_id: str) -> None:
    """The first folder library on a catalog without a blob store is the one whose folder holds its
    blobs; later ones (a shared catalog over folders) hold only what they import themselves."""
    with catalog.write() as s:
        found = team.settings(s)
        unclaimed = team.BLOB_STORE not in found and team.FOLDER_OWNER not in found
        if unclaimed and not team.has_blobs(s):  # a catalog of before this setting: nobody is a guest
            team.set_setting(s, team.FOLDER_OWNER, library_id)


def _record_blob_store(catalog: Catalog, url: str) -> None:
    """Record the team's object store in the catalog (the same URL again is fine)."""
    with catalog.write() as s:
        current = team.get_setting(s, team.BLOB_STORE)
        if current is not None and current != url:
            raise ValidationError(
                f"this catalog's libraries already keep their blobs in {current}; one catalog has one "
                f"blob store: leave out --blob-store (or use {current})",
                field="blob_store",
            )
        if current is None and team.has_blobs(s):
            raise ValidationError(
                f"this catalog's experts keep their blobs in a library folder; move them to {url} from "
                f"that library with: libstore blobs migrate --to {url}",
                field="blob_store",
            )
        team.set_setting(s, team.BLOB_STORE, url)


def _blob_backend(path: Path, catalog: Catalog, library_id: str | None) -> tuple[BlobBackend, bool]:
    """The library folder's own blob store, or the object store the catalog names (read through
    this folder's cache); and whether every blob the catalog references belongs in it (not so for a
    folder library on a catalog whose blobs are another library's folder)."""
    with catalog.read() as s:
        found = team.settings(s)
    url = found.get(team.BLOB_STORE)
    if url is None:
        owner = found.get(team.FOLDER_OWNER)
        return BlobStore(path / config.BLOBS_DIR), owner is None or owner == library_id
    return object_backend(path, catalog, url), True


def object_backend(path: Path, catalog: Catalog, url: str) -> ObjectBlobStore:
    """The object store at ``url`` as this library folder sees it: through its own cache, with its
    claims in ``catalog``."""
    from libstore.store.blob_cache import BlobCache
    from libstore.store.object_store import ObjectBlobStore

    try:
        limit = config.cache_max_bytes()
    except config.SettingError as e:
        raise ValidationError(str(e), field=e.variable) from None
    cache = BlobCache(path / config.CACHE_DIR, limit)
    return ObjectBlobStore(url, cache, team.ClaimLedger(catalog.engine, catalog.location))


@dataclass(frozen=True)
class SchemaState:
    """The catalog's schema revision and the one this libstore writes (``head``)."""

    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def schema_state(path: Path, db_url: str | None = None) -> SchemaState:
    """The schema revision of the library's catalog, read without upgrading it."""
    path = Path(path)
    read_marker(path)
    catalog = Catalog(config.db_url(path, db_url))
    try:
        with translate_errors(catalog.location, catalog.folder), catalog.engine.connect() as conn:
            current = current_revision(conn)
        return SchemaState(current=current, head=head_revision())
    finally:
        catalog.dispose()


def _upgrade(catalog: Catalog) -> None:
    """Bring the catalog to this libstore's schema, with database failures as libstore errors."""
    with translate_errors(catalog.location, catalog.folder):
        ensure_current(catalog.engine)


def _folder_error(path: Path, e: OSError, doing: str) -> StorageError:
    reason = {
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
    }.get(e.errno or 0, e.strerror or str(e))
    return StorageError(
        f"cannot {doing} {path}: {reason}; nothing was changed — choose a writable folder with free space",
        location=str(path),
    )


def _make_dirs(path: Path, made: list[Path]) -> None:
    """``mkdir -p``, remembering each folder it created (to undo a failed init)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for p in reversed(missing):
        p.mkdir()
        made.append(p)


def _made_by_catalog(catalog: Catalog, path: Path, made: list[Path]) -> None:
    """The SQLite files a new catalog inside ``path`` will create (undone if init fails)."""
    db = catalog.engine.url.database
    if not catalog.is_sqlite or not db:
        return
    file = Path(db)
    if not file.exists():
        made.extend(file.with_name(file.name + suffix) for suffix in ("", "-wal", "-shm", "-journal"))


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _undo(made: list[Path]) -> None:
    for p in reversed(made):
        with contextlib.suppress(OSError):
            if p.is_dir() and not p.is_symlink():
                if not any(p.iterdir()):
                    p.rmdir()
            else:
                p.unlink(missing_ok=True)
