"""The root click group: global options, lazy library opening and error-to-exit-code mapping."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from libstore.errors import LibstoreError

if TYPE_CHECKING:  # opening a library imports the catalog: only when a command needs it
    from libstore.library import Library
    from libstore.ops.context import SchemaState
    from libstore.ops.reading import ExpertReader, SnapshotReader


class LibstoreGroup(click.Group):
    """A group that turns libstore errors into a message and their class's exit code (the only
    place exit codes are decided: ``LibstoreError.exit_code``)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LibstoreError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)


class State:
    """What the root options set; the library is opened on first use only."""

    def __init__(self, library: str | None, db_url: str | None) -> None:
        self.library_path = library
        self.db_url = db_url
        self._lib: Library | None = None
        self._snapshot: SnapshotReader | None = None

    @property
    def lib(self) -> Library:
        """The library, opened (and its catalog upgraded) on first use."""
        if self._lib is None:
            from libstore.library import Library

            self._lib = Library.open(self.library_path, db_url=self.db_url)
        return self._lib

    def reader(self) -> ExpertReader:
        """What ``ls``/``show`` read: a read-only snapshot of a current SQLite catalog when there is
        one (no SQLAlchemy import, so they answer in a fraction of a second), else the library."""
        if self._lib is not None:
            return self._lib
        if self._snapshot is None:
            from libstore.ops.reading import open_snapshot_reader

            self._snapshot = open_snapshot_reader(self.library_path, self.db_url, lambda: self.lib)
        return self._snapshot if self._snapshot is not None else self.lib

    def schema(self) -> SchemaState:
        """The catalog's schema revision, read without opening (upgrading) the library."""
        from libstore.library import Library

        return Library.schema_state(self.library_path, db_url=self.db_url)

    def close(self) -> None:
        if self._snapshot is not None:
            self._snapshot.close()
        if self._lib is not None:
            self._lib.close()


@click.group(cls=LibstoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-L",
    "--library",
    "library",
    metavar="PATH",
    envvar="LIBSTORE_HOME",
    help="Library folder (default: $LIBSTORE_HOME, else ~/.libstore).",
)
@click.option(
    "--db",
    "db_url",
    metavar="URL",
    envvar="LIBSTORE_DB_URL",
    help="Catalog database URL (default: $LIBSTORE_DB_URL, else the SQLite file in the library).",
)
@click.version_option(package_name="libstore")
@click.pass_context
def cli(ctx: click.Context, library: str | None, db_url: str | None) -> None:
    """libstore: a catalog, math cache, Hub sync and router for libraries of LoRA experts.

    \b
    Exit codes: 0 ok, 1 other error, 2 bad usage/name/query, 3 no library / library exists,
    4 not found, 5 name taken, 6 invalid input refused, 7 integrity failure, 8 catalog or library
    format too new, 9 catalog busy, 10 Hub error, 11 router error, 12 still in use, 13 storage or
    database unusable (read-only, full, unreachable).
    """
    state = State(library, db_url)
    ctx.obj = state
    ctx.call_on_close(state.close)


def _register() -> None:
    from libstore.cli import base, clusters, db, eval, experts, hub, lowrank, maintenance, route, team

    for module in (experts, base, db, lowrank, clusters, hub, maintenance, route, eval, team):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="libstore")


if __name__ == "__main__":
    main()
