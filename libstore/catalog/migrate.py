"""Run the packaged Alembic migrations at run time: opening an older catalog upgrades it.

Concurrent first opens are serialised (SQLite: ``BEGIN IMMEDIATE`` holds the write lock for the whole
upgrade; PostgreSQL: a transaction-scoped advisory lock). A catalog written by a newer libstore is
detected and refused with a clear message instead of Alembic's "Can't locate revision".
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from libstore.errors import SchemaError

VERSION_TABLE = "libstore_alembic_version"
_PG_LOCK_KEY = 0x6C696273746F7265  # "libstore"


def script_location() -> Path:
    """The migrations folder, whether libstore runs from a wheel or from a source checkout."""
    spec = importlib.util.find_spec("libstore.migrations")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("version_table", VERSION_TABLE)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def upgrade(engine: Engine, target: str = "head") -> str:
    """Bring the catalog to ``target``; return the revision it is at afterwards."""
    return _run(engine, lambda cfg: command.upgrade(cfg, target))


def downgrade(engine: Engine, target: str) -> str:
    return _run(engine, lambda cfg: command.downgrade(cfg, target))


def ensure_current(engine: Engine) -> None:
    """Upgrade if behind; refuse a catalog made by a newer libstore. Cheap when already current."""
    head = head_revision()
    with engine.connect() as conn:
        rev = current_revision(conn)
    if rev == head:
        return
    if rev is not None:
        _check_known(rev)
    upgrade(engine)


def _check_known(rev: str) -> None:
    script = ScriptDirectory.from_config(alembic_config())
    known = {s.revision for s in script.walk_revisions()}
    if rev not in known:
        raise SchemaError(
            f"this catalog is at schema revision {rev}, which this libstore does not know: it was "
            f"written by a newer libstore. Upgrade libstore (pip install -U libstore).",
            revision=rev,
        )


def _run(engine: Engine, action: Callable[[Config], None]) -> str:
    if engine.dialect.name == "sqlite":
        engine = engine.execution_options(sqlite_begin="IMMEDIATE")
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        rev = current_revision(conn)
        if rev is not None:
            _check_known(rev)
        action(alembic_config(conn))
        new = current_revision(conn)
    return new or "base"
