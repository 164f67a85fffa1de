"""``libstore db``: the catalog schema (Alembic migrations shipped with libstore)."""

from __future__ import annotations

import click

from libstore.cli.app import State


@click.group()
def db() -> None:
    """Catalog database schema: upgrade and inspect."""


@db.command()
@click.pass_obj
def upgrade(state: State) -> None:
    """Upgrade the catalog to this libstore's schema (opening a library also does this)."""
    state.lib.close()  # opening the library upgrades its catalog
    click.echo(f"Catalog at revision {state.schema().current} (head)")


@db.command()
@click.pass_obj
def current(state: State) -> None:
    """Print the catalog's schema revision and this libstore's head revision."""
    s = state.schema()
    click.echo(
        f"current {s.current or 'none'}\nhead    {s.head}" + ("" if s.up_to_date else "  (upgrade needed)")
    )


COMMANDS = [db]
