"""``libstore eval`` (run routers on held-out data, record the results) and ``libstore evals``
(list, show, compare, plot and remove recorded evaluations). Only ``eval`` and plots import torch or
matplotlib; listing and comparing read the catalog alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from libstore.cli.app import State
from libstore.cli.options import allow_routing_base_mismatch, option_kwargs
from libstore.cli.output import echo_json, echo_table, json_option
from libstore.types import EVAL_METRICS

METRICS = list(EVAL_METRICS)
DEFAULT_ROUTERS = ("arrow", "spectr", "uniform")  # = ops.evaluate.DEFAULT_ROUTERS, without importing it

_metric_for_plot = click.option(
    "--metric", type=click.Choice(METRICS), default="exact_match", show_default=True, help="For --plot."
)


def _num(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _echo_metrics(rec: Any) -> None:
    rows = []
    for label in rec.routers:
        for task, m in rec.metrics.get(label, {}).items():
            rows.append(
                [
                    label,
                    task,
                    m.examples,
                    _num(m.loss),
                    _num(m.exact_match),
                    _num(m.routing_token),
                    _num(m.routing_sequence),
                ]
            )
    echo_table(
        ["router", "task", "examples", "loss", "exact match", "routing (tokens)", "routing (sequences)"], rows
    )


@click.command("eval")
@click.argument("data", type=click.Path(exists=True, dir_okay=False))
@click.option("--experts", default="kind=task", show_default=True, help="Query selecting the experts.")
@click.option(
    "--router",
    "routers",
    multiple=True,
    default=DEFAULT_ROUTERS,
    metavar="SPEC",
    help="A router to evaluate, repeatable: arrow, arrow:top_n=2, spectr, uniform, oracle, "
    "spectr:granularity=sequence, arrow:general=kind=general ... (default: arrow, spectr, uniform).",
)
@click.option("--base", help="Base model folder or Hub id (default: where the base was registered from).")
@click.option("--top-k", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--name", help="Name of the recorded evaluation (default: eval-N).")
@click.option(
    "--record/--no-record", default=True, help="--no-record: print the results without recording them."
)
@allow_routing_base_mismatch
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), help="Write a routers x tasks heatmap.")
@_metric_for_plot
@click.option("--device", help="cpu, cuda, cuda:1 ... (default: cpu).")
@json_option
@click.pass_obj
def eval_(
    state: State, /, data: str, base: str | None, plot_png: str | None, metric: str, as_json: bool, **kw: Any
) -> None:
    """Evaluate routers on DATA, a JSONL file of {"input", "target", "task"} examples.

    Per router, per task and overall: held-out loss and exact match (greedy continuation = target)
    and, where the task is known, routing accuracy (share of tokens x modules, and of sequences,
    whose top-1 expert is the task's own). Recorded in the catalog with the data's and the experts'
    sha256 (see libstore evals).

    \b
    Example:
      libstore eval heldout.jsonl --experts kind=task --router arrow --router spectr \\
          --router "arrow:general=kind=general" --router oracle --router uniform --plot eval.png
    """
    from libstore.ops.evaluate import EvalOptions, plot

    rec = state.lib.evaluate(data, base=base, **option_kwargs(EvalOptions, kw))
    if plot_png:
        plot(rec, plot_png, metric=metric)
    if as_json:
        echo_json(rec)
        return
    _echo_metrics(rec)
    if rec.name:
        click.echo(f"Recorded as {rec.name}", err=True)
    if plot_png:
        click.echo(f"Plot written to {plot_png}", err=True)


@click.group("evals")
def evals() -> None:
    """Recorded evaluations of routers (made by libstore eval).

    \b
    Example:
      libstore evals ls
      libstore evals compare eval-1 eval-2 --metric loss
    """


@evals.command("ls")
@json_option
@click.pass_obj
def evals_ls(state: State, as_json: bool) -> None:
    """List recorded evaluations; 'stale' where an expert's weights changed since."""
    views = state.lib.evals()
    if as_json:
        echo_json([{**_summary(v)} for v in views])
        return
    echo_table(
        ["name", "created", "base", "query", "examples", "routers", "stale"],
        [
            [
                v.record.name,
                v.record.created_at.strftime("%Y-%m-%d %H:%M") if v.record.created_at else "",
                v.record.base_model,
                v.record.query,
                v.record.examples,
                ", ".join(v.record.routers),
                "stale" if v.stale else "",
            ]
            for v in views
        ],
    )


def _summary(v: Any) -> dict[str, Any]:
    from libstore.cli.output import to_jsonable

    out: dict[str, Any] = to_jsonable(v.record)
    out["stale"] = v.stale
    out["stale_reasons"] = list(v.stale_reasons)
    return out


@evals.command("show")
@click.argument("name")
@click.option("--plot", "plot_png", type=click.Path(dir_okay=False), help="Write a routers x tasks heatmap.")
@_metric_for_plot
@json_option
@click.pass_obj
def evals_show(state: State, name: str, plot_png: str | None, metric: str, as_json: bool) -> None:
    """Show one evaluation's results per router and task."""
    v = state.lib.evaluation(name)
    if plot_png:
        state.lib.plot_eval(name, Path(plot_png), metric=metric)
    if as_json:
        echo_json(_summary(v))
        return
    r = v.record
    click.echo(
        f"{r.name}: {r.examples} examples of {r.data_path} (sha256 {r.data_sha256[:12]}), "
        f"base {r.base_model}, experts {r.query!r} ({len(r.experts)})"
    )
    if v.stale:
        click.echo("stale: " + "; ".join(v.stale_reasons))
    _echo_metrics(r)


@evals.command("compare")
@click.argument("names", nargs=-1, required=True)
@click.option("--metric", type=click.Choice(METRICS), default="exact_match", show_default=True)
@json_option
@click.pass_obj
def evals_compare(state: State, names: tuple[str, ...], metric: str, as_json: bool) -> None:
    """Line up evaluations NAMES on one metric, per router and task."""
    c = state.lib.compare_evals(names, metric=metric)
    if as_json:
        echo_json(c)
        return
    echo_table(["router", "task", *c.names], [[r, t, *(_num(v) for v in vals)] for r, t, vals in c.rows])
    for note in c.notes:
        click.echo(f"note: {note}", err=True)


@evals.command("rm")
@click.argument("name")
@click.pass_obj
def evals_rm(state: State, name: str) -> None:
    """Remove a recorded evaluation."""
    state.lib.remove_eval(name)
    click.echo(f"Removed evaluation {name}")


COMMANDS = [eval_, evals]
