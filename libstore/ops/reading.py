"""Reading the catalog without opening the library: ``ls`` and ``show`` in a fraction of a second.

Opening a library imports SQLAlchemy, creates an engine and checks the schema — most of what a
listing costs at the command line. When the catalog (the library's SQLite file, or PostgreSQL) is at
this libstore's schema, :func:`open_snapshot_reader` reads it through the driver instead
(``catalog/snapshots.py``), with the same statements (``catalog/reads.py``) and the same checks of the
query and the page, so it returns the same records as :class:`libstore.Library`. In every other case
(an upgrade due, another database, a driver error) it returns ``None``, or hands over to the full
library mid-way, which then reports or repairs the problem as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from libstore import config
from libstore.catalog import reads
from libstore.catalog.snapshots import Snapshot, Unavailable, open_snapshot
from libstore.errors import NotFoundError
from libstore.ops.query import parse_listing
from libstore.store.marker import read_marker
from libstore.types import Expert, ExpertQuery, ExpertSort, ExpertSummary

T = TypeVar("T")


class ExpertReader(Protocol):
    """What ``ls`` and ``show`` read: :class:`libstore.Library` and :class:`SnapshotReader` both."""

    def summaries(
        self,
        query: str | ExpertQuery | None = None,
        *,
        sort: ExpertSort = "name",
        descending: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[ExpertSummary]: ...

    def experts(
        self,
        query: str | ExpertQuery | None = None,
        *,
        sort: ExpertSort = "name",
        descending: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Expert]: ...

    def get(self, name: str) -> Expert: ...


class SnapshotReader:
    """Expert records from a read-only catalog snapshot (``catalog/snapshots.py``); ``fallback`` (the
    library, opened on demand) answers whatever the snapshot cannot."""

    def __init__(self, snapshot: Snapshot, fallback: Callable[[], ExpertReader]) -> None:
        self._snapshot = snapshot
        self._fallback = fallback

    def _read(self, read: Callable[[reads.Reader], T], full: Callable[[ExpertReader], T]) -> T:
        try:
            return read(self._snapshot.reader)
        except Unavailable:
            self.close()  # its read transaction must not outlive it (a PostgreSQL one holds locks)
            return full(self._fallback())

    def summaries(
        self,
        query: str | ExpertQuery | None = None,
        *,
        sort: ExpertSort = "name",
        descending: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[ExpertSummary]:
        q = parse_listing(query, sort, limit, offset)
        return self._read(
            lambda db: reads.list_summaries(
                db, q, sort=sort, descending=descending, limit=limit, offset=offset
            ),
            lambda lib: lib.summaries(query, sort=sort, descending=descending, limit=limit, offset=offset),
        )

    def experts(
        self,
        query: str | ExpertQuery | None = None,
        *,
        sort: ExpertSort = "name",
        descending: bool = False,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[Expert]:
        q = parse_listing(query, sort, limit, offset)
        return self._read(
            lambda db: reads.list_experts(
                db, q, sort=sort, descending=descending, limit=limit, offset=offset
            ),
            lambda lib: lib.experts(query, sort=sort, descending=descending, limit=limit, offset=offset),
        )

    def get(self, name: str) -> Expert:
        found = self._read(
            lambda db: reads.experts(db, reads.Page(reads.name_is(name))), lambda lib: [lib.get(name)]
        )
        if not found:
            raise NotFoundError.expert(name)
        return found[0]

    def close(self) -> None:
        self._snapshot.close()


def open_snapshot_reader(
    library: str | None, db_url: str | None, fallback: Callable[[], ExpertReader]
) -> SnapshotReader | None:
    """A :class:`SnapshotReader` of the library's catalog if it has a snapshot reader and is at this
    libstore's schema, else ``None``. ``library.json`` is checked first, as opening does (its errors
    are the same)."""
    path = config.library_path(library)
    read_marker(path)
    try:
        snapshot = open_snapshot(config.db_url(path, db_url))
    except Unavailable:
        return None
    return SnapshotReader(snapshot, fallback)
