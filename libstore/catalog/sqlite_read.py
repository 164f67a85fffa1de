"""A read-only snapshot of a SQLite catalog through the standard ``sqlite3`` module: what ``ls`` and
``show`` read from, so they answer without importing SQLAlchemy.

It serves only a catalog that is already at this libstore's schema; anything else (no such file, an
older or newer schema, a driver error while opening) is :class:`Unavailable`, and the caller opens
the library the full way, which upgrades, refuses or reports the problem with the usual errors. The
statements are ``catalog/reads.py``'s, so the records are the same either way. The connection is
opened ``mode=ro`` with ``query_only``: it can never write, create or upgrade the file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from libstore.catalog.reads import Reader
from libstore.catalog.revisions import VERSION_TABLE, head_revision
from libstore.config import BUSY_TIMEOUT_MS


class Unavailable(Exception):
    """This snapshot cannot serve the read; open the library the full way instead."""


class SqliteSnapshot:
    """One ``BEGIN`` ... ``ROLLBACK`` read transaction on a SQLite catalog file (WAL serves it from
    one snapshot, as ``Catalog.read()`` does)."""

    def __init__(self, db_file: Path) -> None:
        try:
            self._conn = sqlite3.connect(
                f"{db_file.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except (sqlite3.Error, OSError, ValueError) as e:
            raise Unavailable(str(e)) from None
        try:
            self._conn.execute("PRAGMA query_only=ON")
            self._conn.execute("BEGIN")
            version = self._conn.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchall()
        except sqlite3.Error as e:
            self.close()
            raise Unavailable(str(e)) from None
        if version != [(head_revision(),)]:
            self.close()
            raise Unavailable(f"the catalog is at schema {version}, not {head_revision()}")
        self.reader = Reader(self._rows, "sqlite")

    def _rows(self, sql: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        try:
            return self._conn.execute(sql, dict(params)).fetchall()
        except sqlite3.Error as e:
            raise Unavailable(str(e)) from None

    def close(self) -> None:
        self._conn.close()
