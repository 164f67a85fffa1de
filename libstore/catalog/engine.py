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
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, exc, text
from sqlalchemy.orm import Session, sessionmaker

from libstore.errors import AlreadyExistsError, CatalogBusyError, LibstoreError

BUSY_TIMEOUT_MS = 30_000
#: PostgreSQL: class id of the advisory lock write transactions take ("libs"); the object id is the
#: hash of the current schema, so libraries in different schemas of one database do not contend.
PG_WRITE_LOCK_CLASS = 0x6C696273
T = TypeVar("T")


def make_engine(url: str) -> Engine:
    """An engine for ``url`` with the pragmas and transaction handling libstore relies on."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False}
        )
        _configure_sqlite(engine)
        return engine
    return create_engine(url, pool_pre_ping=True)


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
    """The catalog database: an engine plus a session factory; ``write()`` and ``read()`` scopes."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.is_sqlite = url.startswith("sqlite")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False, autoflush=True)

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only scope (rolled back at the end)."""
        with self._sessions() as session:
            try:
                yield session
            finally:
                session.rollback()

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: commit at the end, roll back on any error. Takes the write lock first."""
        bind = self.engine
        if self.is_sqlite:
            bind = self.engine.execution_options(sqlite_begin="IMMEDIATE")  # type: ignore[assignment]
        session = Session(bind=bind, expire_on_commit=False, autoflush=True)
        try:
            with translate_errors():
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


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn driver-level lock, constraint and connection failures into libstore errors."""
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
    except exc.OperationalError as e:
        msg = str(e.orig).lower()
        if any(w in msg for w in ("locked", "busy", "lock timeout", "could not serialize", "deadlock")):
            raise CatalogBusyError(
                "the catalog stayed locked by other writers; try again, or use PostgreSQL "
                "for many concurrent writers"
            ) from e
        raise LibstoreError(f"catalog database error: {e.orig}") from e
