"""``libstore verify`` and ``libstore gc``: is the library sound, and reclaim what nothing uses.

``gc`` never imports torch; ``verify`` does only to recompute cached prototypes.
"""

from __future__ import annotations

import re
from typing import Any

import click

from libstore.cli.app import State
from libstore.cli.output import (
    echo_json,
    echo_table,
    human_bytes,
    json_option,
    to_jsonable,
)

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class Duration(click.ParamType[float, Any]):
    """Seconds, or a number with a unit: ``90``, ``90s``, ``30m``, ``1h``, ``2d``."""

    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        m = _DURATION.fullmatch(str(value))
        if m is None:
            self.fail(f"{value!r} is not a duration (e.g. 0, 90s, 30m, 1h, 2d)", param, ctx)
        return float(m[1]) * _UNITS[m[2]]


def _grace_option(fn: Any) -> Any:
    return click.option(
        "--grace",
        "grace_s",
        type=Duration(),
        default="1h",
        show_default=True,
        help="Keep unreferenced blobs and temp files written or re-used more recently than this: "
        "an import in flight stores its blobs before it commits (one that stages for longer "
        "fails with exit 9 and changes nothing). 0 only when nothing else writes to the library.",
    )(fn)


@click.command("verify")
@click.option(
    "--repair",
    is_flag=True,
    help="Fix what is safe: re-record blob rows, drop bad or wrong prototype caches (recomputed "
    "on demand), quarantine corrupt blobs, drop rows pointing at deleted rows, remove "
    "old temp files. Never deletes an expert.",
)
@_grace_option
@json_option
@click.pass_obj
def verify(state: State, repair: bool, grace_s: float, as_json: bool) -> None:
    """Check that catalog and blob store agree.

    Every blob is re-hashed; every expert's stored files must pass the importer's checks, match its
    record (modules, shapes, rank, dtype, alpha, hashes, sizes) and fit its base model; every cached
    prototype set must be the prototypes of its weights (recomputed and compared); every reference
    (derivation parents, prototype caches, clusterings, sync records) must point at an existing row.
    Warnings (temp files, blobs of an import in flight, orphaned caches) do not fail verify. Exits
    with 7 if errors remain.

    \b
    Example:
      libstore verify
      libstore verify --repair --json
    """
    from libstore.ops.problems import iter_problem_dicts

    report = state.lib.verify(repair=repair, grace_s=grace_s)
    if as_json:
        echo_json(
            {
                "ok": report.ok,
                "experts": report.experts,
                "blobs": report.blobs,
                "bytes_hashed": report.bytes_hashed,
                "errors": len(report.errors),
                "warnings": len(report.warnings),
                "problems": list(iter_problem_dicts(report)),
            }
        )
    else:
        rows = []
        for d in iter_problem_dicts(report):
            fix = d["repair"]
            rows.append(
                [
                    d["severity"],
                    d["code"],
                    d["message"],
                    "" if fix is None else ("fixed: " if fix["fixed"] else "") + fix["action"],
                ]
            )
        if rows:
            echo_table(["severity", "problem", "detail", "repair"], rows)
        verdict = "ok" if report.ok else f"{len(report.errors)} error(s)"
        click.echo(
            f"Verified {report.experts} experts and {report.blobs} blobs "
            f"({human_bytes(report.bytes_hashed)} hashed): {verdict}, "
            f"{len(report.warnings)} warning(s)"
        )
        if not report.ok and not repair:
            click.echo("Run libstore verify --repair to fix what can be fixed safely.", err=True)
    if not report.ok:
        click.get_current_context().exit(7)


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="List what would be removed; change nothing.")
@_grace_option
@json_option
@click.pass_obj
def gc(state: State, dry_run: bool, grace_s: float, as_json: bool) -> None:
    """Remove unreferenced blobs (files and rows), prototype caches of weights no expert has any
    more, and temp files of crashed writes.

    Safe while others import: a blob written or re-used within the grace period is kept even if no
    row references it yet, a blob re-used while gc deletes it is put back, and a writer whose blob
    gc took anyway fails (exit 9) instead of recording it.

    \b
    Example:
      libstore gc --dry-run
      libstore gc --grace 0     # a library nobody else is writing to
    """
    report = state.lib.gc(dry_run=dry_run, grace_s=grace_s)
    if as_json:
        echo_json(to_jsonable(report))
        return
    verb = "Would remove" if dry_run else "Removed"
    click.echo(
        f"{verb} {len(report.blobs)} blob(s) ({human_bytes(report.bytes_freed)}), "
        f"{len(report.caches)} prototype cache(s), {len(report.temp)} temp file(s)"
    )
    if report.kept:
        click.echo(f"Kept {len(report.kept)} unreferenced blob(s) claimed within the grace period")


COMMANDS = [verify, gc]
