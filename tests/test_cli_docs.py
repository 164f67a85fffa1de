"""Every CLI command has help text with an example and is documented in the README."""

from __future__ import annotations

from pathlib import Path

import click

from libstore.cli import cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, cmd in sorted(group.commands.items()):
        full = f"{prefix}{name}"
        out.append((full, cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, full + " ")
    return out


def test_every_command_has_help_and_is_in_the_readme() -> None:
    missing_help = [n for n, c in _commands(cli) if not (c.help or "").strip()]
    assert missing_help == []
    undocumented = [n for n, c in _commands(cli) if f"libstore {n}" not in README]
    assert undocumented == [], "document these commands in README.md"
