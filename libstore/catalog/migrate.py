"""Run the packaged Alembic migrations at run time: opening an older catalog upgrades it.

Concurrent first opens are serialised (SQLite: ``BEGIN IMMEDIATE`` holds the write lock for the whole
upgrade; PostgreSQL: a transaction-scoped advisory lock). A catalog written by a newer libstore is
detected and refused with a clear message instead of Alembic's "Can't locate revision".

Opening a current catalog costs no Alembic import: the check reads the version row with one plain
``SELECT`` and compares it with the head of the revision chain (``catalog/revisions.py``, read from
the migration files' own text). Alembic (about half a second of imports) loads only when an upgrade
or downgrade runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect, text

from libstore.catalog.revisions import VERSION_TABLE, check_known, head_revision, script_location
from libstore.errors import SchemaError

if TYPE_CHECKING:  # Alembic is imported only where a migration actually runs
    from alembic.config import Config

_PG_LOCK_KEY = 0x6C696273746F7265  # "libstore"


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("version_table", VERSION_TABLE)
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def current_revision(connection: Connection) -> str | None:
    """The catalog's revision from its version row (``None`` for an empty database), plain SQL."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    rows = [r[0] for r in connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))]
    if len(rows) > 1:
        raise SchemaError(
            f"the catalog's {VERSION_TABLE} table has {len(rows)} rows ({', '.join(rows)}); libstore "
            f"writes one — restore the catalog from a backup or ask for help",
            revision=",".join(rows),
        )
    return rows[0] if rows else None


def upgrade(engine: Engine, target: str = "head") -> str:
    """Bring the catalog to ``target``; return the revision it is at afterwards."""
    from alembic import command

    return _run(engine, lambda cfg: command.upgrade(cfg, target))


def downgrade(engine: Engine, target: str) -> str:
    from alembic import command

    return _run(engine, lambda cfg: command.downgrade(cfg, target))


def ensure_current(engine: Engine) -> None:
    """Upgrade if behind; refuse a catalog made by a newer libstore. One ``SELECT`` when current."""
    head = head_revision()
    with engine.connect() as conn:
        rev = current_revision(conn)
    if rev == head:
        return
    if rev is not None:
        check_known(rev)
    upgrade(engine)


def _run(engine: Engine, action: Callable[[Config], None]) -> str:
    if engine.dialect.name == "sqlite":
        engine = engine.execution_options(sqlite_begin="IMMEDIATE")
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        rev = current_revision(conn)
        if rev is not None:
            check_known(rev)
        action(alembic_config(conn))
        new = current_revision(conn)
    return new or "base"
