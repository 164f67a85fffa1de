"""Engines and sessions: SQLite pragmas, write transactions that take the lock up front, error mapping.

SQLite with many processes needs WAL, a busy timeout and foreign keys per connection, and writes that
read first must start with ``BEGIN IMMEDIATE`` or two writers deadlock into "database is locked"
(SQLAlchemy's documented pysqlite transaction fix: let SQLAlchemy, not the driver, emit BEGIN).

PostgreSQL gets the same guarantee: every write transaction first takes a transaction-scoped
advisory lock (one per schema), so writers are serialised exactly as on SQLite and the operations'
"check, then insert" steps (a name is free, a blob or tag row exists) cannot race under READ
COMMITTED. Write transactions are short (blobs are stored before or outside them), reads never take
the lock. A unique constraint that still fails (a writer outside libstore) becomes
:class:`AlreadyExistsError`, never a raw driver error.

Reads see one snapshot: an operation that lists experts runs several statements (experts, then their
files, tags, ...), and a writer committing between them must not show up half. PostgreSQL read scopes
are ``REPEATABLE READ READ ONLY`` transactions; SQLite read scopes are one ``BEGIN`` ... ``ROLLBACK``
transaction, which WAL serves from one snapshot.

A database that cannot be used — read-only, full, unreachable, missing, a bad URL, a driver that is
not installed — is a :class:`StorageError` naming the database with its password replaced by ``***``.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import URL, Engine, create_engine, event, exc, make_url, text
from sqlalchemy.orm import Session

from libstore.config import BUSY_TIMEOUT_MS, CONNECT_TIMEOUT_S
from libstore.errors import AlreadyExistsError, CatalogBusyError, LibstoreError, StorageError

#: PostgreSQL: class id of the advisory lock write transactions take ("libs"); the object id is the
#: hash of the current schema, so libraries in different schemas of one database do not contend.
PG_WRITE_LOCK_CLASS = 0x6C696273
T = TypeVar("T")

#: The transaction handle ``Catalog.read()``/``write()`` yield; operations pass it to catalog
#: functions and never use it themselves (no SQL outside ``catalog/``).
Transaction = Session

_READ_ONLY = "is read-only; make the library folder and its catalog writable (or work on a writable copy)"
_FULL = "is on a full disk; free some space and try again"
_UNREADABLE = (
    "cannot be opened or read; check that the library folder exists, is on a local disk and is readable"
)
#: Driver messages that mean the database itself cannot be used, and what to do about each.
_STORAGE_FAILURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("readonly database", "read-only", "read only file system"), _READ_ONLY),
    (("disk is full", "no space left", "disk full", "could not extend file"), _FULL),
    (("disk i/o error", "unable to open database file"), _UNREADABLE),
)


def _sqlite_folder_state(folder: Path | None) -> str | None:
    """Why a SQLite catalog's folder fails, when its file system says so: SQLite reports a full or
    read-only disk as a plain "disk I/O error" when the shared-memory or WAL file cannot grow."""
    if folder is None:
        return None
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return _READ_ONLY
    if st.f_bavail * st.f_frsize < (1 << 20):
        return _FULL
    return None


def safe_url(url: str | URL) -> str:
    """``url`` as text with its password replaced by ``***``: the only form messages may show."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return "an unparseable database URL"


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the pragmas and transaction handling libstore relies on.

    A URL that does not parse, names an unknown database kind or a driver that is not installed is a
    :class:`StorageError` (nothing is connected yet, so nothing was changed).
    """
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise StorageError(
            "the catalog database URL does not parse; give --db (or LIBSTORE_DB_URL) as "
            "dialect+driver://user@host:port/database, e.g. postgresql+psycopg://me@db.example/team",
            location=safe_url(url),
        ) from None
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(
                parsed, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
            )
            _configure_sqlite(engine)
            return engine
        args = {} if "connect_timeout" in parsed.query else {"connect_timeout": CONNECT_TIMEOUT_S}
        return create_engine(parsed, pool_pre_ping=True, connect_args=args)
    except exc.NoSuchModuleError:
        raise StorageError(
            f"cannot use the catalog database {safe_url(parsed)}: libstore does not know that kind of "
            f"database; use sqlite:///PATH or postgresql+psycopg://USER@HOST/DATABASE",
            location=safe_url(parsed),
        ) from None
    except ImportError as e:
        raise StorageError(
            f"cannot use the catalog database {safe_url(parsed)}: its driver {e.name or ''} is not "
            f"installed; install it (pip install {e.name or 'the driver'}), or use postgresql+psycopg:// "
            f"(pip install 'libstore[postgres]')",
            location=safe_url(parsed),
        ) from None


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver must not emit BEGIN itself
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Catalog:
    """The catalog database: an engine; ``write()`` and ``read()`` transaction scopes."""

    def __init__(self, url: str) -> None:
        #: the full URL, to open the same catalog again; it may hold a password: never show it
        self.url = url
        self.engine = make_engine(url)
        #: the database as messages may name it (password replaced by ``***``)
        self.location = safe_url(self.engine.url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        db_file = self.engine.url.database if self.is_sqlite else None
        #: the folder of a SQLite catalog file (``None`` for a server or in-memory database)
        self.folder = Path(db_file).resolve().parent if db_file and db_file != ":memory:" else None
        self._read_bind = self.engine
        if self.engine.dialect.name == "postgresql":
            self._read_bind = self.engine.execution_options(
                isolation_level="REPEATABLE READ", postgresql_readonly=True
            )

    def __repr__(self) -> str:
        return f"Catalog({self.location})"

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction that sees one snapshot of the catalog (rolled back at the end)."""
        session = Session(bind=self._read_bind, expire_on_commit=False, autoflush=True)
        try:
            with translate_errors(self.location, self.folder):
                yield session
        finally:
            session.rollback()
            session.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: commit at the end, roll back on any error. Takes the write lock first."""
        bind = self.engine
        if self.is_sqlite:
            bind = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        session = Session(bind=bind, expire_on_commit=False, autoflush=True)
        try:
            with translate_errors(self.location, self.folder):
                if self.engine.dialect.name == "postgresql":
                    _pg_write_lock(session)
                yield session
                session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def retrying(self, fn: Callable[[Session], T], *, attempts: int = 8) -> T:
        """Run ``fn`` in a write transaction, retrying when the database stays busy."""
        for attempt in range(attempts):
            try:
                with self.write() as session:
                    return fn(session)
            except CatalogBusyError:
                if attempt == attempts - 1:
                    raise
                time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        self.engine.dispose()


def _pg_write_lock(session: Session) -> None:
    """PostgreSQL's ``BEGIN IMMEDIATE``: wait (up to the busy timeout) for the schema's write lock."""
    session.execute(text(f"SET LOCAL lock_timeout = '{int(BUSY_TIMEOUT_MS)}ms'"))
    session.execute(
        text("SELECT pg_advisory_xact_lock(:cls, hashtext(coalesce(current_schema(), '')))"),
        {"cls": PG_WRITE_LOCK_CLASS},
    )


def _is_unique_violation(e: exc.IntegrityError) -> bool:
    orig = e.orig
    return getattr(orig, "sqlstate", None) == "23505" or "UNIQUE constraint failed" in str(orig)


def _storage_error(location: str, e: exc.DBAPIError, folder: Path | None) -> StorageError | None:
    """The :class:`StorageError` a driver error amounts to, if the database itself is unusable."""
    msg = str(e.orig).strip()
    low = msg.lower()
    for words, what in _STORAGE_FAILURES:
        if any(w in low for w in words):
            if what is _UNREADABLE:
                what = _sqlite_folder_state(folder) or what
            return StorageError(
                f"the catalog database {location} {what} ({msg}); nothing was changed", location=location
            )
    state = getattr(e.orig, "sqlstate", None)
    connecting = isinstance(e, exc.OperationalError) and state is None and not e.statement
    if (
        e.connection_invalidated
        or connecting
        or (state is not None and state[:2] in ("08", "28", "3D", "53"))
    ):
        return StorageError(
            f"cannot use the catalog database {location}: {msg}; nothing was changed — check --db or "
            f"LIBSTORE_DB_URL (host, port, database name, user) and that the server is running",
            location=location,
        )
    return None


@contextlib.contextmanager
def translate_errors(location: str = "", folder: Path | None = None) -> Iterator[None]:
    """Turn driver-level lock, constraint, storage and connection failures into libstore errors.

    ``location`` names the database in messages (password hidden); ``folder`` is where a SQLite
    catalog lives, consulted to tell a full or read-only disk from other I/O errors.
    """
    try:
        yield
    except LibstoreError:
        raise
    except exc.IntegrityError as e:
        if _is_unique_violation(e):
            raise AlreadyExistsError(
                f"another writer stored the same name or key at the same time ({e.orig}); "
                f"nothing was changed — check what is there now and try again"
            ) from e
        raise LibstoreError(
            f"catalog constraint violated ({e.orig}); nothing was changed — try again, and run "
            f"libstore verify if it persists"
        ) from e
    except exc.DBAPIError as e:
        msg = str(e.orig).lower()
        if any(w in msg for w in ("locked", "busy", "lock timeout", "could not serialize", "deadlock")):
            raise CatalogBusyError(
                "the catalog stayed locked by other writers; try again, or use PostgreSQL "
                "for many concurrent writers"
            ) from e
        storage = _storage_error(location or "in use", e, folder)
        if storage is not None:
            raise storage from e
        if not isinstance(e, exc.OperationalError):
            raise
        raise LibstoreError(f"catalog database error: {e.orig}") from e
