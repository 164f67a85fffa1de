"""Read-only snapshots of a catalog through the database's own driver (``sqlite3``, ``psycopg``): what
``ls`` and ``show`` read from, so they answer without importing SQLAlchemy.

A snapshot serves only a catalog that is already at this libstore's schema; anything else (an
unknown URL form, no such file, an older or newer schema, a driver that is missing or fails) is
:class:`Unavailable`, and the caller opens the library the full way, which upgrades, refuses or
reports the problem with the usual errors. The statements are ``catalog/reads.py``'s, so the records
are the same either way. Neither snapshot can write: SQLite is opened ``mode=ro`` with
``query_only``, PostgreSQL reads in a ``REPEATABLE READ READ ONLY`` transaction (one snapshot, as
``Catalog.read()``).
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from libstore.catalog.reads import Reader
from libstore.catalog.revisions import VERSION_TABLE, head_revision
from libstore.config import BUSY_TIMEOUT_MS, CONNECT_TIMEOUT_S

_SQLITE_FILE = re.compile(r"^sqlite(\+pysqlite)?:///(?P<path>[^?]+)$")
_POSTGRES = re.compile(r"^postgresql(\+psycopg)?://")
_PARAM = re.compile(r":(w\d+_\d+)\b")  # the parameter names catalog/reads.py makes


class Unavailable(Exception):
    """This snapshot cannot serve the read; open the library the full way instead."""


class Snapshot:
    """One read transaction; :attr:`reader` runs ``catalog/reads.py``'s statements in it."""

    def __init__(
        self,
        conn: Any,
        run: Callable[[str, Mapping[str, Any]], Sequence[Sequence[Any]]],
        dialect: str,
        errors: tuple[type[Exception], ...],
    ) -> None:
        self._conn = conn
        self._run = run
        self._errors = errors
        self.reader = Reader(self._rows, dialect)
        version = self._rows(f"SELECT version_num FROM {VERSION_TABLE}", {})
        if [tuple(v) for v in version] != [(head_revision(),)]:
            self.close()
            raise Unavailable(f"the catalog is at schema {version}, not {head_revision()}")

    def _rows(self, sql: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        try:
            return self._run(sql, params)
        except self._errors as e:  # the driver failed: the full library reads (and reports) instead
            self.close()
            raise Unavailable(str(e)) from None

    def close(self) -> None:
        with contextlib.suppress(*self._errors):  # closing a broken connection releases nothing more
            self._conn.close()


def open_snapshot(url: str) -> Snapshot:
    """A snapshot of the catalog at ``url`` (the library's SQLite file, or a PostgreSQL server)."""
    sqlite_file = _SQLITE_FILE.match(url)
    if sqlite_file is not None:
        return _sqlite(Path(sqlite_file["path"]))
    if _POSTGRES.match(url):
        return _postgres(_POSTGRES.sub("postgresql://", url))
    raise Unavailable("only SQLite files and PostgreSQL have a snapshot reader")


def _sqlite(db_file: Path) -> Snapshot:
    try:
        conn = sqlite3.connect(
            f"{db_file.resolve().as_uri()}?mode=ro",
            uri=True,
            timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA query_only=ON")
        conn.execute("BEGIN")
    except (sqlite3.Error, OSError, ValueError) as e:
        raise Unavailable(str(e)) from None

    def run(sql: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        return conn.execute(sql, dict(params)).fetchall()

    return Snapshot(conn, run, "sqlite", (sqlite3.Error,))


def _postgres(conninfo: str) -> Snapshot:
    try:
        import psycopg
    except ImportError:
        raise Unavailable("psycopg is not installed") from None
    try:
        if "connect_timeout" not in conninfo:
            conn = psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S)
        else:
            conn = psycopg.connect(conninfo)
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
    except psycopg.Error as e:  # unreachable, refused: the library says so
        raise Unavailable(type(e).__name__) from None

    def run(sql: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        return conn.execute(_PARAM.sub(r"%(\1)s", sql), dict(params)).fetchall()

    return Snapshot(conn, run, "postgresql", (psycopg.Error,))
