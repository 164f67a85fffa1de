"""``libstore base``: register and inspect base models."""

from __future__ import annotations

import click

from libstore.cli.app import State
from libstore.cli.output import echo_json, echo_table, json_option


@click.group()
def base() -> None:
    """Base models the experts were trained on."""


@base.command("add")
@click.argument("name")
@click.option(
    "--from",
    "source",
    required=True,
    metavar="PATH_OR_HUB_ID",
    help="A local model folder or a Hub id (only its config is read).",
)
@click.option("--revision", help="Hub revision.")
@json_option
@click.pass_obj
def add(state: State, name: str, source: str, revision: str | None, as_json: bool) -> None:
    """Register base model NAME: architecture, config fingerprint, Linear module shapes.

    \b
    Example:
      libstore base add phi3 --from microsoft/Phi-3-mini-4k-instruct
      libstore base add tiny --from ./tiny-model
    """
    b = state.lib.add_base(name, source, revision=revision)
    if as_json:
        echo_json(b)
    else:
        click.echo(f"Registered {b.name}: {b.architecture}, {len(b.linear_shapes)} Linear modules")


@base.command("ls")
@json_option
@click.pass_obj
def ls(state: State, as_json: bool) -> None:
    """List registered base models."""
    bases = state.lib.bases()
    if as_json:
        echo_json(bases)
        return
    echo_table(
        ["name", "architecture", "linear modules", "source", "fingerprint"],
        [[b.name, b.architecture, len(b.linear_shapes), b.source, b.fingerprint[:12]] for b in bases],
    )


@base.command("show")
@click.argument("name")
@json_option
@click.pass_obj
def show(state: State, name: str, as_json: bool) -> None:
    """Show a base model and its Linear module shapes."""
    b = state.lib.base(name)
    if as_json:
        echo_json(b)
        return
    click.echo(
        f"{b.name}: {b.architecture} ({b.model_type}) from {b.source}"
        f"{'@' + b.revision if b.revision else ''}\nfingerprint {b.fingerprint}"
    )
    for m, s in sorted(b.linear_shapes.items()):
        click.echo(f"  {m}: {s.in_features} -> {s.out_features}")


@base.command("rm")
@click.argument("name")
@click.pass_obj
def rm(state: State, name: str) -> None:
    """Unregister a base model that no expert uses."""
    state.lib.remove_base(name)
    click.echo(f"Removed base model {name}")


COMMANDS = [base]
