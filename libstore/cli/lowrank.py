"""Commands of the low-rank core: prototypes, gks, similarity, merge, lineage, stale.

Thin wrappers over ``Library`` methods; the operations import torch when they run, so ``--help``,
``lineage`` and ``stale`` never do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from libstore.cli.app import State
from libstore.cli.options import option_kwargs
from libstore.cli.output import echo_json, echo_table, json_option, to_jsonable
from libstore.types import GKS_MODES, PROTOTYPE_METHODS, SIMILARITY_METRICS

if TYPE_CHECKING:
    from libstore.ops.lineage import ParentState

METHOD = click.Choice(PROTOTYPE_METHODS)


def _query(words: tuple[str, ...]) -> str | None:
    return " ".join(words) or None


def _short(sha: str | None) -> str:
    return sha[:12] if sha else "-"


def _parent_json(p: ParentState) -> dict[str, Any]:
    """A derivation parent as recorded, with what it is now, as one flat object."""
    return {
        "role": p.parent.role,
        "name": p.parent.name,
        "sha256": p.parent.sha256,
        "current_name": p.current_name,
        "current_sha256": p.current_sha256,
        "status": p.status,
    }


# --- prototypes --------------------------------------------------------------------------------


@click.group("prototypes")
def prototypes() -> None:
    """Arrow prototypes: per expert and LoRA module, the top right singular vector(s) of ΔW,
    computed once and cached by the expert's content hash.

    \b
    Example:
      libstore prototypes compute 'kind=task'
      libstore prototypes show arc_easy --module model.layers.0.self_attn.q_proj
    """


def _method_options(fn: Any) -> Any:
    fn = click.option("--device", help="Where to compute (default: cuda if available, else cpu).")(fn)
    fn = click.option(
        "--seed",
        type=int,
        default=0,
        show_default=True,
        help="peft method: seed of the start vector (PEFT's rng_seed).",
    )(fn)
    fn = click.option(
        "--iters", type=int, default=15, show_default=True, help="peft method: power-iteration steps."
    )(fn)
    fn = click.option(
        "--top-n",
        type=int,
        default=1,
        show_default=True,
        help="exact method: prototypes per module (top singular vectors).",
    )(fn)
    fn = click.option(
        "--method",
        type=METHOD,
        default="exact",
        show_default=True,
        help="exact SVD, or PEFT's power iteration (bit-identical to create_arrow_model).",
    )(fn)
    return fn


@prototypes.command("compute")
@click.argument("query", nargs=-1)
@_method_options
@json_option
@click.pass_obj
def prototypes_compute(state: State, /, query: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Compute and cache the prototypes of the experts matching QUERY (default: all).

    Only what is not cached yet is computed: a second call computes nothing.

    \b
    Example:
      libstore prototypes compute 'kind=task,residual'
      libstore prototypes compute arc_easy --method peft --seed 0
    """
    from libstore.ops.prototypes import PrototypeOptions

    report = state.lib.compute_prototypes(_query(query), **option_kwargs(PrototypeOptions, kw))
    if as_json:
        echo_json(report)
        return
    click.echo(
        f"{len(report.computed)} computed, {len(report.cached)} already cached "
        f"({report.method} v{report.method_version} {report.params}; "
        f"{report.batched_calls} batched call(s) on {report.device})"
    )


@prototypes.command("show")
@click.argument("name")
@click.option(
    "--module",
    "modules",
    multiple=True,
    metavar="NAME",
    help="Only this LoRA module (repeatable); prints its full vectors.",
)
@_method_options
@json_option
@click.pass_obj
def prototypes_show(state: State, /, name: str, modules: tuple[str, ...], as_json: bool, **kw: Any) -> None:
    """Show the prototypes of expert NAME (computed and cached first if missing).

    \b
    Example:
      libstore prototypes show arc_easy
      libstore prototypes show arc_easy --module model.layers.0.self_attn.q_proj --json
    """
    from libstore.ops.prototypes import PrototypeOptions

    found = state.lib.prototypes([name], modules=list(modules) or None, **option_kwargs(PrototypeOptions, kw))
    p = found[name]
    if as_json:
        echo_json(
            {
                "expert": p.expert,
                "sha256": p.expert_sha256,
                "method": p.method,
                "method_version": p.method_version,
                "params": p.params,
                "modules": {
                    m: {"values": pr.values.tolist(), "vectors": pr.vectors.tolist()}
                    for m, pr in p.modules.items()
                },
            }
        )
        return
    click.echo(f"{p.expert} ({_short(p.expert_sha256)}): {p.method} v{p.method_version} {p.params}")
    echo_table(
        ["module", "in", "values"],
        [
            [m, pr.vectors.shape[-1], ", ".join(f"{v:.6g}" for v in pr.values.tolist())]
            for m, pr in p.modules.items()
        ],
    )
    if modules:
        for m, pr in p.modules.items():
            for i, v in enumerate(pr.vectors.tolist()):
                click.echo(f"\n{m} vector {i}:\n  " + " ".join(f"{x:+.6f}" for x in v))


@prototypes.command("ls")
@json_option
@click.pass_obj
def prototypes_ls(state: State, as_json: bool) -> None:
    """List cached prototype sets: expert hash, method, parameters, experts having that hash.

    \b
    Example:
      libstore prototypes ls --json
    """
    entries = state.lib.prototype_cache()
    if as_json:
        echo_json(entries)
        return
    echo_table(
        ["experts", "expert sha256", "method", "params", "blob"],
        [
            [
                ",".join(e.experts) or "(orphaned)",
                _short(e.expert_sha256),
                f"{e.method} v{e.method_version}",
                e.params,
                _short(e.blob_sha256),
            ]
            for e in entries
        ],
    )


# --- gks ---------------------------------------------------------------------------------------


@click.command("gks")
@click.option(
    "--general", required=True, metavar="QUERY", help="The general-knowledge experts, e.g. 'kind=general'."
)
@click.option("--experts", required=True, metavar="QUERY", help="The experts to purify, e.g. 'kind=task'.")
@click.option(
    "--mode",
    type=click.Choice(GKS_MODES),
    default="param",
    show_default=True,
    help="param: A−mean(A_g), B−mean(B_g) as PEFT (equal ranks); delta: ΔW−mean(ΔW_g) exactly (any ranks).",
)
@click.option("--rank", type=int, help="delta mode: truncate residuals to this rank (SVD).")
@click.option("--suffix", default="_res", show_default=True, help="Residual name = expert name + suffix.")
@click.option(
    "--refresh", is_flag=True, help="Recompute in place residuals whose inputs changed (see libstore stale)."
)
@click.option("--device", help="Where to compute (default: cpu, so results do not depend on the machine).")
@json_option
@click.pass_obj
def gks(state: State, /, general: str, experts: str, as_json: bool, **kw: Any) -> None:
    """GenKnowSub: store residual experts (kind=residual) = expert minus the general experts' mean.

    Residuals computed before from the same inputs are reused, not recomputed.

    \b
    Example:
      libstore gks --general kind=general --experts kind=task
      libstore gks --general 'wiki_*' --experts kind=task --mode delta --rank 16
    """
    from libstore.ops.derive import GksOptions

    report = state.lib.subtract_general(general=general, experts=experts, **option_kwargs(GksOptions, kw))
    if as_json:
        echo_json(
            {
                **to_jsonable(report),
                "created": report.created,
                "reused": report.reused,
                "refreshed": report.refreshed,
            }
        )
        return
    click.echo(f"{report.method} with general experts {', '.join(report.general)}")
    for item in report.items:
        energy = f" (energy kept {item.energy_kept:.4f})" if item.energy_kept is not None else ""
        click.echo(f"{item.status:9}  {item.residual}  <- {item.expert}{energy}")
    click.echo(
        f"{len(report.created)} created, {len(report.refreshed)} refreshed, {len(report.reused)} reused"
    )


# --- similarity --------------------------------------------------------------------------------


@click.command("similarity")
@click.argument("query", nargs=-1)
@click.option(
    "--metric",
    type=click.Choice(SIMILARITY_METRICS),
    default="delta",
    show_default=True,
    help="delta: cosine of ΔW (exact, trace formula); flat: cosine of flattened parameters.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    metavar="PNG",
    help="Also write a heatmap to this PNG file.",
)
@click.option("--device", help="Where to compute (default: cuda if available, else cpu).")
@json_option
@click.pass_obj
def similarity(
    state: State, /, query: tuple[str, ...], plot_path: str | None, as_json: bool, **kw: Any
) -> None:
    """Cosine-similarity matrix of the experts matching QUERY (default: all).

    \b
    Example:
      libstore similarity 'kind=task' --metric delta --plot sim.png
      libstore similarity arc_easy arc_challenge --json
    """
    from libstore.ops.similarity import SimilarityOptions

    m = state.lib.similarity(_query(query), **option_kwargs(SimilarityOptions, kw))
    if plot_path:
        state.lib.plot_similarity(m, plot_path)
    if as_json:
        echo_json(m)
    else:
        echo_table(
            ["", *m.names],
            [[n, *(f"{v:.3f}" for v in row)] for n, row in zip(m.names, m.values, strict=True)],
        )
    if plot_path:
        click.echo(f"Wrote {plot_path}", err=as_json)


# --- merge -------------------------------------------------------------------------------------


def _weights(_ctx: click.Context, _param: click.Parameter, value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        return [float(x) for x in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@click.command("merge")
@click.argument("names", nargs=-1, required=True)
@click.option("--name", required=True, help="Name of the merged expert.")
@click.option("--rank", type=int, help="Truncate to this rank by SVD (default: exact, rank Σ r_i).")
@click.option(
    "--weights", callback=_weights, metavar="W1,W2,...", help="One weight per expert (default: uniform 1/n)."
)
@click.option("--refresh", is_flag=True, help="Recompute an existing merge NAME whose inputs changed.")
@click.option("--device", help="Where to compute (default: cpu, so results do not depend on the machine).")
@json_option
@click.pass_obj
def merge(state: State, /, names: tuple[str, ...], name: str, as_json: bool, **kw: Any) -> None:
    """Merge experts NAMES by averaging their ΔW (kind=merged), exactly re-factorised.

    \b
    Example:
      libstore merge arc_easy arc_challenge boolq --name qa_avg --rank 16
      libstore merge a b --name ab --weights 0.7,0.3
    """
    from libstore.ops.derive import MergeOptions

    e = state.lib.merge(names, name=name, **option_kwargs(MergeOptions, kw))
    if as_json:
        echo_json(e)
        return
    params = e.lineage.params if e.lineage is not None else {}
    click.echo(
        f"Merged {', '.join(names)} into {e.name} (rank {e.rank}, "
        f"energy kept {params.get('energy_kept', 1.0):.4f}, sha256 {_short(e.sha256)})"
    )


# --- lineage and stale -------------------------------------------------------------------------


@click.command("lineage")
@click.argument("name")
@json_option
@click.pass_obj
def lineage(state: State, name: str, as_json: bool) -> None:
    """How expert NAME was derived (parents, method, parameters) and what was derived from it.

    \b
    Example:
      libstore lineage arc_easy_res
    """
    info = state.lib.lineage(name)
    if as_json:
        state_ = info.derivation
        echo_json(
            {
                "name": info.name,
                "kind": info.kind,
                "sha256": info.sha256,
                "derivation": None
                if state_ is None
                else {
                    **to_jsonable(state_.derivation),
                    "parents": [_parent_json(p) for p in state_.parents],
                },
                "children": to_jsonable(info.children),
                "stale": info.is_stale,
                "stale_reasons": list(info.stale_reasons),
            }
        )
        return
    click.echo(f"{info.name} ({info.kind}, {_short(info.sha256)})")
    if info.derivation is None:
        click.echo("  not derived (imported)")
    else:
        d = info.derivation.derivation
        click.echo(f"  method  {d.method} v{d.method_version}")
        click.echo(f"  params  {d.params}")
        click.echo(f"  created {d.created_at.isoformat() if d.created_at else '-'}")
        click.echo("  parents:")
        for p in info.derivation.parents:
            note = {"ok": "", "changed": f"  CHANGED, now {_short(p.current_sha256)}", "gone": "  GONE"}[
                p.status
            ]
            click.echo(f"    {p.parent.role:8} {p.parent.name} ({_short(p.parent.sha256)}){note}")
        if info.is_stale:
            click.echo("  stale: " + "; ".join(info.stale_reasons) + "; recompute with --refresh")
    if info.children:
        click.echo("  children:")
        for c in info.children:
            click.echo(f"    {c.name} ({c.method}, as {c.role})")


@click.command("stale")
@json_option
@click.pass_obj
def stale(state: State, as_json: bool) -> None:
    """Derived experts whose parents changed or are gone, prototype caches of experts that no
    longer exist, and clusterings whose experts changed, are gone or gained new matches.

    \b
    Example:
      libstore stale
      libstore stale --json
    """
    report = state.lib.stale()
    if as_json:
        echo_json(
            {
                "experts": [
                    {**to_jsonable(e), "parents": [_parent_json(p) for p in e.parents]}
                    for e in report.experts
                ],
                "caches": to_jsonable(report.caches),
                "clusterings": to_jsonable(report.clusterings),
            }
        )
        return
    if report.empty:
        click.echo("Nothing is stale.")
        return
    if report.experts:
        echo_table(
            ["expert", "kind", "method", "why"],
            [[e.name, e.kind, e.method, "; ".join(e.reasons)] for e in report.experts],
        )
    if report.caches:
        if report.experts:
            click.echo()
        echo_table(
            ["orphaned prototype cache", "method", "params", "blob"],
            [
                [_short(c.expert_sha256), f"{c.method} v{c.method_version}", c.params, _short(c.blob_sha256)]
                for c in report.caches
            ],
        )
    if report.clusterings:
        if report.experts or report.caches:
            click.echo()
        echo_table(
            ["clustering", "metric", "k", "why"],
            [[c.name, c.metric, c.k, "; ".join(c.reasons)] for c in report.clusterings],
        )


COMMANDS = [prototypes, gks, similarity, merge, lineage, stale]
