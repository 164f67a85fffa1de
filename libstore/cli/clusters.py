"""``libstore cluster`` and ``libstore clusters``: MBC task clustering recorded in the catalog.

Thin wrappers over ``Library`` methods. Only ``cluster`` and ``clusters plot`` compute (and import
torch); ``ls``, ``show``, ``export`` and ``rm`` read the catalog only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from libstore.cli.app import State
from libstore.cli.options import option_kwargs
from libstore.cli.output import echo_json, echo_table, json_option, to_jsonable
from libstore.types import EXPORT_FORMATS, SIMILARITY_METRICS, ExportFormat

if TYPE_CHECKING:
    from libstore.ops.clusters import Clustering


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _short_list(items: tuple[str, ...] | list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit})" if len(items) > limit else "")


def _k_range(text: str | None) -> list[int] | None:
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    try:
        if sep:
            return list(range(int(lo), int(hi) + 1))
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise click.BadParameter(f"expected LO:HI or a list like 2,4,8; got {text!r}") from None


def _json(c: Clustering) -> dict[str, Any]:
    """A clustering as one flat object: the record's fields, each input and cluster with its state."""
    rec = c.record
    return {
        **{k: v for k, v in to_jsonable(rec).items() if k not in ("inputs", "clusters")},
        "silhouette": c.silhouette,
        "clusters": [
            {
                **to_jsonable(cl.record),
                "size": cl.size,
                "within": cl.within,
                "between": cl.between,
                "silhouette": cl.silhouette,
                "experts": list(cl.experts),
            }
            for cl in c.clusters
        ],
        "inputs": [
            {
                "name": i.input.name,
                "sha256": i.input.sha256,
                "current_name": i.current_name,
                "current_sha256": i.current_sha256,
                "status": i.status,
            }
            for i in c.inputs
        ],
        "added": list(c.added),
        "stale": c.stale,
        "stale_reasons": list(c.stale_reasons),
    }


def _show(c: Clustering, *, members: bool = True) -> None:
    rec = c.record
    click.echo(
        f"{rec.name}: {rec.method} ({rec.metric} metric), k={rec.k}, {len(c.inputs)} experts of "
        f"base {rec.base_model}, query {rec.query!r}, seed {rec.seed}"
    )
    crit = rec.criterion
    if crit.get("name") == "silhouette":
        scores = ", ".join(f"{k}: {_num(v)}" for k, v in crit.get("scores", {}).items())
        click.echo(f"k chosen by silhouette over {crit['k_range'][0]}..{crit['k_range'][-1]}: {scores}")
    elif crit.get("name") != "given":
        click.echo(f"k: {crit.get('name')} ({crit.get('note', '')})")
    if crit.get("note") and crit.get("name") == "silhouette":
        click.echo(f"note: {crit['note']}")
    p = rec.params
    if rec.metric == "flat":
        click.echo(
            f"params: keep {p.get('keep')}, dim {p.get('dim')} (used {p.get('features_dim')}), "
            f"n_init {p.get('n_init')}"
        )
    else:
        click.echo(f"params: n_init {p.get('n_init')}")
    click.echo(
        f"silhouette {_num(c.silhouette)}; created {rec.created_at:%Y-%m-%d %H:%M:%S} UTC"
        if rec.created_at
        else f"silhouette {_num(c.silhouette)}"
    )
    if c.stale:
        click.echo("STALE: " + "; ".join(c.stale_reasons))
    click.echo()
    echo_table(
        ["cluster", "size", "within", "between", "silhouette", "cluster experts", "tasks"],
        [
            [
                cl.record.index,
                cl.size,
                _num(cl.within),
                _num(cl.between),
                _num(cl.silhouette),
                _short_list(cl.experts, 3) or "-",
                _short_list(cl.record.tasks),
            ]
            for cl in c.clusters
        ],
    )
    if members:
        click.echo()
        for r in rec.clusters:
            click.echo(f"{rec.name}:{r.index} members: {', '.join(r.members)}")


@click.command("cluster")
@click.option(
    "--experts",
    default="kind=task",
    show_default=True,
    metavar="QUERY",
    help="Which experts to cluster (catalog query).",
)
@click.option("--k", "k", type=int, help="Number of clusters (default: chosen by silhouette).")
@click.option("--k-range", metavar="LO:HI", help="Without --k: the k to try (default 2:min(20, n-1)).")
@click.option(
    "--metric",
    type=click.Choice(SIMILARITY_METRICS),
    default="flat",
    show_default=True,
    help="flat: mttl's MBC (flattened parameters, top --keep, SVD to --dim, cosine); "
    "delta: exact cosine of ΔW.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="k-means seed.")
@click.option("--name", help="Name of the clustering (default mbc-k<k>, mbc-delta-k<k>).")
@click.option(
    "--keep",
    type=float,
    default=0.2,
    show_default=True,
    help="flat: fraction of each expert's parameters kept by magnitude.",
)
@click.option("--dim", type=int, default=64, show_default=True, help="flat: SVD dimensions.")
@click.option("--n-init", type=int, default=10, show_default=True, help="k-means restarts.")
@click.option("--device", help="delta: where ΔW inner products run (default cuda if available).")
@json_option
@click.pass_obj
def cluster(state: State, /, experts: str, k_range: str | None, as_json: bool, **kw: Any) -> None:
    """Cluster experts by the similarity of their parameters (MBC) and record the run.

    The run is recorded with every parameter and the hash of every expert it saw: a changed or added
    expert marks it stale (clusters ls / show, libstore stale). Clusters are numbered by their first
    member in name order; the same inputs and seed give the same clusters.

    \b
    Example:
      libstore cluster --experts 'kind=task' --k 10 --name mbc-k10
      libstore cluster --experts 'kind=task tag=v2' --k-range 2:30 --metric delta
      libstore clusters export mbc-k10 --format csv
    """
    from libstore.ops.clusters import ClusterOptions

    c = state.lib.cluster(experts, **option_kwargs(ClusterOptions, {**kw, "k_range": _k_range(k_range)}))
    if as_json:
        echo_json(_json(c))
        return
    click.echo(f"Recorded clustering {c.record.name}")
    _show(c, members=False)


@click.group("clusters")
def clusters() -> None:
    """Recorded clusterings: list, show, export task lists, plot, remove.

    \b
    Example:
      libstore clusters ls
      libstore clusters show mbc-k10
      libstore clusters export mbc-k10 --format json > clusters.json
      libstore add ./c3_adapter --kind cluster --cluster mbc-k10:3
      libstore clusters plot mbc-k10 --out mbc.png
    """


@clusters.command("ls")
@json_option
@click.pass_obj
def ls(state: State, as_json: bool) -> None:
    """List recorded clusterings, with whether each is stale.

    \b
    Example:
      libstore clusters ls
      libstore clusters ls --json
    """
    items = state.lib.clusterings()
    if as_json:
        echo_json([_json(c) for c in items])
        return
    echo_table(
        ["name", "base", "metric", "k", "experts", "silhouette", "stale", "query", "created"],
        [
            [
                c.record.name,
                c.record.base_model,
                c.record.metric,
                c.record.k,
                len(c.inputs),
                _num(c.silhouette),
                "STALE" if c.stale else "-",
                c.record.query,
                f"{c.record.created_at:%Y-%m-%d %H:%M}" if c.record.created_at else "-",
            ]
            for c in items
        ],
    )


@clusters.command("show")
@click.argument("name")
@json_option
@click.pass_obj
def show(state: State, name: str, as_json: bool) -> None:
    """Show a clustering: parameters, how k was chosen, whether it is stale, and per cluster its
    members, tasks, within/between similarity, silhouette and linked cluster experts.

    \b
    Example:
      libstore clusters show mbc-k10
      libstore clusters show mbc-k10 --json
    """
    c = state.lib.clustering(name)
    if as_json:
        echo_json(_json(c))
        return
    _show(c)


@clusters.command("export")
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default="json", show_default=True)
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), help="Write to this file instead of stdout."
)
@click.pass_obj
def export(state: State, name: str, fmt: ExportFormat, out: Path | None) -> None:
    """Print the task list of every cluster, ready to train one cluster expert per cluster.

    \b
    json: {"clustering", "k", "clusters": [{"index", "cluster", "tasks", "members"}, ...], ...}
    csv:  cluster,task  (one row per task)

    \b
    Example:
      libstore clusters export mbc-k10 --format json --out clusters.json
      libstore clusters export mbc-k10 --format csv
    """
    text = state.lib.export_clustering(name, fmt)
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text)
        click.echo(f"Wrote {out}", err=True)


@clusters.command("plot")
@click.argument("name")
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG file to write."
)
@click.pass_obj
def plot(state: State, name: str, out: Path) -> None:
    """Write a PNG: the similarity matrix ordered by cluster, and a 2-D embedding of the experts.

    The similarity is recomputed from the experts the run saw (with its metric and parameters).

    \b
    Example:
      libstore clusters plot mbc-k10 --out mbc.png
    """
    path = state.lib.plot_clustering(name, out)
    click.echo(f"Wrote {path}")


@clusters.command("rm")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove even if cluster experts link to it (links are cleared).")
@click.pass_obj
def rm(state: State, name: str, force: bool) -> None:
    """Remove a recorded clustering (experts are not touched). Refuses while cluster experts are
    linked to it, unless --force (their link is cleared; their tasks stay).

    \b
    Example:
      libstore clusters rm mbc-k10
    """
    unlinked = state.lib.remove_clustering(name, force=force)
    click.echo(
        f"Removed clustering {name}"
        + (f"; unlinked cluster experts: {', '.join(unlinked)}" if unlinked else "")
    )


COMMANDS = [cluster, clusters]
