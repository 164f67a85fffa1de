"""Models and migrations agree, and every migration goes up, down and up again, on both databases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from libstore.catalog import migrate, revisions
from libstore.catalog.engine import make_engine
from libstore.catalog.models import Base
from libstore.errors import SchemaError

ROOT = Path(__file__).resolve().parents[1]


def _url(db_url: str | None, tmp_path: Path) -> str:
    return db_url or f"sqlite:///{tmp_path / 'catalog.db'}"


def _schema_diff(engine) -> list:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={
                "compare_type": True,
                "include_name": lambda name, type_, _p: (
                    not (type_ == "table" and name == revisions.VERSION_TABLE)
                ),
            },
        )
        return compare_metadata(ctx, Base.metadata)


def test_models_and_migrations_agree(db_url: str | None, tmp_path: Path) -> None:
    engine = make_engine(_url(db_url, tmp_path))
    assert migrate.upgrade(engine) == revisions.head_revision()
    assert _schema_diff(engine) == []
    engine.dispose()


def test_each_revision_up_down_up(db_url: str | None, tmp_path: Path) -> None:
    """Walk the history one step at a time, as an old library being upgraded would."""
    engine = make_engine(_url(db_url, tmp_path))
    script = ScriptDirectory.from_config(migrate.alembic_config())
    history = [s.revision for s in reversed(list(script.walk_revisions()))]
    for rev in history:
        assert migrate.upgrade(engine, rev) == rev
    assert _schema_diff(engine) == []
    assert migrate.downgrade(engine, "base") == "base"
    assert set(inspect(engine).get_table_names()) <= {revisions.VERSION_TABLE}
    migrate.upgrade(engine)
    assert _schema_diff(engine) == []
    tables = set(inspect(engine).get_table_names())
    assert {"experts", "prototype_cache", "derivations", "clusterings", "remote_experts"} <= tables
    assert "alembic_version" not in tables  # the host application's table name stays free
    engine.dispose()


def test_revision_chain_read_without_alembic_is_alembics() -> None:
    """``revisions.revisions`` reads the chain from the files' text (no Alembic import on open); it must
    be exactly the chain Alembic loads, and its head Alembic's head."""
    script = ScriptDirectory.from_config(migrate.alembic_config())
    assert revisions.revisions() == {s.revision: s.down_revision for s in script.walk_revisions()}
    assert revisions.head_revision() == script.get_current_head()


def test_catalog_from_a_newer_libstore_is_refused(tmp_path: Path) -> None:
    engine = make_engine(_url(None, tmp_path))
    migrate.upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {revisions.VERSION_TABLE} SET version_num = 'ffff9999'")
    with pytest.raises(SchemaError, match="newer libstore") as e:
        migrate.ensure_current(engine)
    assert e.value.revision == "ffff9999" and e.value.exit_code == 8
    engine.dispose()


def test_expert_names_compare_bytewise(db_url: str | None, tmp_path: Path) -> None:
    """Migration 0002 (PostgreSQL: the name column in the ``C`` collation). Alembic's model comparison
    cannot see collations, so this checks the column itself, after a walk down and up again."""
    engine = make_engine(_url(db_url, tmp_path))
    migrate.upgrade(engine, "0001")
    migrate.upgrade(engine)

    def collation() -> str | None:
        name = next(c for c in inspect(engine).get_columns("experts") if c["name"] == "name")
        return name["type"].collation

    assert collation() == ("C" if engine.dialect.name == "postgresql" else None)
    migrate.downgrade(engine, "0001")
    assert collation() is None
    engine.dispose()


def test_alembic_command_line_uses_the_same_migrations(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    alembic = [sys.executable, "-m", "alembic", "-c", str(ROOT / "alembic.ini"), "-x", f"url={url}"]
    up = subprocess.run([*alembic, "upgrade", "head"], capture_output=True, text=True, cwd=ROOT)
    assert up.returncode == 0, up.stderr
    cur = subprocess.run([*alembic, "current"], capture_output=True, text=True, cwd=ROOT)
    assert revisions.head_revision() in cur.stdout
    engine = make_engine(url)
    assert _schema_diff(engine) == []
    engine.dispose()
