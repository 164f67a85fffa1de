"""``libstore db``: the catalog schema (Alembic migrations shipped with libstore)."""

from __future__ import annotations

import click

from libstore import config
from libstore.cli.app import State


@click.group()
def db() -> None:
    """Catalog database schema: upgrade and inspect."""


def _engine(state: State):  # type: ignore[no-untyped-def]
    from libstore.catalog.engine import make_engine

    return make_engine(config.db_url(config.library_path(state.library_path), state.db_url))


@db.command()
@click.pass_obj
def upgrade(state: State) -> None:
    """Upgrade the catalog to this libstore's schema (opening a library also does this)."""
    from libstore.catalog.migrate import upgrade as run_upgrade

    engine = _engine(state)
    rev = run_upgrade(engine)
    engine.dispose()
    click.echo(f"Catalog at revision {rev} (head)")


@db.command()
@click.pass_obj
def current(state: State) -> None:
    """Print the catalog's schema revision and this libstore's head revision."""
    from libstore.catalog.migrate import current_revision, head_revision

    engine = _engine(state)
    with engine.connect() as conn:
        rev = current_revision(conn)
    engine.dispose()
    head = head_revision()
    click.echo(f"current {rev or 'none'}\nhead    {head}" + ("" if rev == head else "  (upgrade needed)"))


COMMANDS = [db]
