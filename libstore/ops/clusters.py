"""MBC task clustering of stored experts, recorded in the catalog.

One run (:func:`cluster`) selects experts by a query, builds their similarity matrix, runs k-means on
its rows (k given, or chosen by silhouette), and records everything in one transaction: the parameters,
the criterion with every score, the sha256 of every expert it saw, and per cluster its members, tasks
and within/between similarity and silhouette. The math is all in ``libstore.lowrank``: the streamed
similarities (``lowrank.clustering.mbc_similarity``, ``lowrank.similarity.delta_similarity``) and the
partition (``lowrank.partition.partition``: k-means on the similarity's rows, k by silhouette). This
module only reads the experts' tensors for them, group by group, and records the result.

Metrics:

- ``flat`` (default): mttl's MBC — each expert's LoRA parameters flattened in a fixed order (modules
  sorted by name, A then B), the largest ``keep`` fraction by magnitude kept per expert, an exact
  truncated SVD to ``dim`` dimensions, L2-normalised, cosine. Needs equal ranks.
- ``delta``: the exact cosine of the experts' updates ΔW (Frobenius, over all modules). Any ranks.

**Streaming.** Tensors are never held for all experts at once when they do not fit ``STREAM_BYTES``
(256 MiB): the flat metric reads each expert once to find its magnitude threshold (keeping the first
group of modules' columns on the way), then builds the n × n Gram matrix of the sparsified rows one
further group of modules at a time (every expert's slice of that group, then the next group); the delta
metric accumulates ⟨ΔWᵢ, ΔWⱼ⟩ group by group. Memory is O(n² + STREAM_BYTES) however large the
experts are; a library that fits the budget is read once.

**Staleness.** A run is stale when an expert it saw changed or is gone, or a new expert of its base
model matches its query (see ``libstore.catalog.clusterings``). Nothing is recomputed behind the
user's back: run it again under a new name (or remove the old one first).

torch is imported only by the functions that compute (``cluster``, ``plot``), so listing, showing and
exporting clusterings stay cheap.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libstore.catalog import clusterings as cat
from libstore.catalog.clusterings import Cluster, Clustering, InputState
from libstore.errors import AlreadyExistsError, IncompatibleExpertsError, ValidationError
from libstore.ops.context import Context
from libstore.ops.query import format_query, parse_query
from libstore.ops.select import resolve_experts
from libstore.ops.tensors import check_compatible, default_device, load_expert_tensors
from libstore.store.adapter import validate_name
from libstore.types import (
    EXPORT_FORMATS,
    SIMILARITY_METRICS,
    ClusteringInput,
    ClusteringRecord,
    ClusterRecord,
    Expert,
    ExpertQuery,
    ExportFormat,
    SimilarityMetric,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "Cluster",
    "ClusterOptions",
    "Clustering",
    "InputState",
    "cluster",
    "clusterings",
    "export",
    "get",
    "plot",
    "remove",
    "similarity_matrix",
    "stale_clusterings",
]

METHOD = "mbc"
METHOD_VERSION = 1
DEFAULT_QUERY = "kind=task"
#: Expert tensors held at once while building a similarity matrix (bytes); beyond it, stream.
STREAM_BYTES = 256 << 20

ExpertsArg = str | ExpertQuery | Sequence[str] | None


# --- running -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterOptions:
    """The options of one MBC run (``libstore cluster``, ``Library.cluster``); see :func:`cluster`."""

    k: int | None = None
    metric: SimilarityMetric = "flat"
    seed: int = 0
    name: str | None = None
    keep: float = 0.2
    dim: int = 64
    k_range: tuple[int, ...] | None = None
    n_init: int = 10
    device: str | None = None


def cluster(ctx: Context, experts: ExpertsArg = DEFAULT_QUERY, *, options: ClusterOptions) -> Clustering:
    """Cluster the experts ``experts`` selects and record the run as ``options.name``.

    Args (``experts``, then the fields of ``options``):
        experts: a query (``"kind=task"``), an ``ExpertQuery`` or a list of expert names.
        k: number of clusters; ``None`` chooses it by the best mean silhouette over ``k_range``
            (default 2..min(20, n − 1)); every score is recorded.
        metric: ``flat`` (mttl's MBC) or ``delta`` (exact cosine of ΔW); see the module doc.
        seed: k-means seed; the same inputs and seed give the same clustering.
        name: the clustering's name (default ``mbc-k<k>``, ``mbc-delta-k<k>`` for delta).
        keep, dim: flat metric: fraction of entries kept per expert, SVD dimensions.
        n_init: k-means restarts (mttl's default 10).
        device: delta metric: where ΔW inner products run (default cuda if available, else cpu).
    """
    import torch

    from libstore.lowrank.partition import MAX_ITER, partition

    o = options
    k, metric, seed, name, keep, dim = o.k, o.metric, o.seed, o.name, o.keep, o.dim
    k_range, n_init, device = o.k_range, o.n_init, o.device
    _check_params(metric=metric, keep=keep, dim=dim, n_init=n_init, seed=seed)
    query = _as_query(experts)
    query_text = format_query(query)
    if name is not None:
        validate_name(name)
        with ctx.catalog.read() as s:
            if cat.clustering_exists(s, name):
                raise AlreadyExistsError(
                    f"a clustering named {name!r} already exists; pass another --name, or remove "
                    f"it first: libstore clusters rm {name}",
                    what="clustering",
                    name=name,
                )
    chosen = resolve_experts(ctx, query_text)  # the canonical text: errors quote the query
    check_experts(chosen, metric)
    n = len(chosen)
    ks = _k_choices(k, k_range, n, query_text)
    with torch.no_grad():
        S, features_dim = similarity_matrix(ctx, chosen, metric=metric, keep=keep, dim=dim, device=device)
    part = partition(S, k=k, k_range=ks, seed=seed, n_init=n_init)
    name = name if name is not None else default_name(metric, part.k)
    params: dict[str, Any] = {
        "method_version": METHOD_VERSION,
        "keep": keep if metric == "flat" else None,
        "dim": dim if metric == "flat" else None,
        "features_dim": features_dim,
        "n_init": n_init,
        "max_iter": MAX_ITER,
        "k": k,
        "k_range": None if k is not None else list(ks),
        "n_experts": n,
    }
    members: dict[int, list[Expert]] = {}
    for e, label in zip(chosen, part.labels, strict=True):
        members.setdefault(label, []).append(e)
    record = ClusteringRecord(
        name=name,
        base_model=chosen[0].base_model,
        method=METHOD,
        metric=metric,
        k=part.k,
        seed=seed,
        query=query_text,
        params=params,
        criterion=part.criterion,
        inputs=tuple(ClusteringInput(e.name, e.sha256) for e in chosen),
        clusters=tuple(
            ClusterRecord(
                index=c,
                members=tuple(e.name for e in members[c]),
                tasks=tuple(sorted({t for e in members[c] for t in (e.tasks or (e.name,))})),
                stats=part.stats[c],
            )
            for c in range(part.k)
        ),
    )
    with ctx.catalog.write() as s:
        cat.insert_clustering(s, record, require_inputs=True)
        return cat.clustering(s, name, parse=parse_query)


def default_name(metric: str, k: int) -> str:
    return f"mbc-k{k}" if metric == "flat" else f"mbc-{metric}-k{k}"


def _as_query(experts: ExpertsArg) -> ExpertQuery:
    if experts is None or isinstance(experts, str | ExpertQuery):
        return parse_query(experts)
    names = [validate_name(n) for n in experts]
    if not names:
        raise ValidationError("no experts given to cluster")
    return ExpertQuery(names=tuple(sorted(set(names))))


def _check_params(*, metric: str, keep: float, dim: int, n_init: int, seed: int) -> None:
    if metric not in SIMILARITY_METRICS:
        raise ValidationError(
            f"unknown metric {metric!r}; metrics are {', '.join(SIMILARITY_METRICS)}", field="metric"
        )
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0.0 < keep <= 1.0:
        raise ValidationError(f"keep must be a fraction in (0, 1], e.g. 0.2; got {keep!r}", field="keep")
    for label, value, low in (("dim", dim, 1), ("n_init", n_init, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValidationError(f"{label} must be an integer >= {low}, got {value!r}", field=label)
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**31) <= seed < 2**31:
        raise ValidationError(
            f"seed must be a 32-bit integer (the catalog stores it as one), got {seed!r}", field="seed"
        )


def check_experts(experts: Sequence[Expert], metric: str) -> None:
    """Experts one similarity can compare: compatible, and for the flat metric of equal ranks."""
    check_compatible(experts, operation="cluster")
    if metric == "flat":
        first = experts[0]
        for e in experts[1:]:
            if e.modules != first.modules:
                m = next(m for m in sorted(first.modules) if e.modules[m] != first.modules[m])
                raise IncompatibleExpertsError(
                    f"cluster: module {m!r} has rank {first.modules[m].rank} in {first.name!r} but "
                    f"{e.modules[m].rank} in {e.name!r}; the flat metric compares raw parameters and "
                    f"needs equal ranks — use --metric delta (exact ΔW cosine, any ranks)"
                )


def _k_choices(k: int | None, k_range: Iterable[int] | None, n: int, query: str) -> list[int]:
    """The k values to try: ``[k]`` when given, else ``k_range`` or 2..min(20, n − 1); all validated."""
    from libstore.lowrank.partition import DEFAULT_K_MAX

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValidationError(f"k must be a positive integer, got {value!r}", field="k")
        if value > n:
            raise ValidationError(
                f"k={value} but only {n} expert(s) match {query!r}; k can be at most {n}", field="k"
            )
        return value

    if k is not None:
        if k_range is not None:
            raise ValidationError("pass k or k_range, not both", field="k_range")
        return [check(k)]
    if k_range is not None:
        ks = sorted({check(v) for v in k_range})
        if not ks:
            raise ValidationError("k_range is empty; give at least one k, e.g. 2..10", field="k_range")
        return ks
    return list(range(2, min(DEFAULT_K_MAX, n - 1) + 1))


# --- the similarity, streamed from the store -----------------------------------------------------


def similarity_matrix(
    ctx: Context,
    experts: Sequence[Expert],
    *,
    metric: SimilarityMetric = "flat",
    keep: float = 0.2,
    dim: int = 64,
    device: str | None = None,
    budget_bytes: int | None = None,
) -> tuple[torch.Tensor, int | None]:
    """The (n, n) float64 similarity MBC clusters on, streamed from the store; and, for the flat
    metric, the feature dimension used (``None`` for delta). Experts must be compatible (same base
    model and modules; equal ranks for flat). ``budget_bytes`` (default ``STREAM_BYTES``) bounds the
    expert tensors held at once.

    Values are rounded to 12 decimals: identical experts then have similarity exactly 1 (distance
    exactly 0), so eigensolver rounding noise of 1e-16 never decides a silhouette (where 0 vs 1e-16
    flips a score from 0 to -1), and summation-order differences between BLAS builds mostly vanish.
    """
    import torch

    from libstore.lowrank.clustering import mbc_similarity
    from libstore.lowrank.similarity import module_groups

    budget = STREAM_BYTES if budget_bytes is None else budget_bytes
    n = len(experts)
    ctx.blobs.fetch(e.sha256 for e in experts)  # a team library downloads them in parallel
    if metric == "flat":
        widths = {m: s.rank * (s.in_features + s.out_features) for m, s in experts[0].modules.items()}
        groups = module_groups(widths, n, budget)
        modules = sorted(widths)

        rows = (_flat(ctx, e, modules) for e in experts)  # whole rows: the thresholds need them
        blocks = flat_blocks(ctx, experts, groups[1:])

        S, fdim = mbc_similarity(
            rows,
            blocks,
            n=n,
            first_width=sum(widths[m] for m in groups[0]),
            keep=keep,
            dim=dim,
            # sparsified_gram's own working buffer: a fraction of the budget, wide enough for BLAS speed
            block_cols=max(1024, budget // 8 // (4 * n)),
        )
        return torch.round(S, decimals=12), fdim
    if metric != "delta":
        raise ValidationError(
            f"unknown metric {metric!r}; metrics are {', '.join(SIMILARITY_METRICS)}", field="metric"
        )
    S = delta_similarity(ctx, experts, device=default_device(device), budget=budget)
    return torch.round(S, decimals=12), None


def _flat(ctx: Context, e: Expert, modules: Sequence[str]) -> torch.Tensor:
    """One expert's ``modules`` flattened (sorted by name, A then B), float32, on CPU: a new tensor,
    so nothing of the memory-mapped file stays referenced."""
    import torch

    from libstore.lowrank.similarity import flatten_lora

    t = load_expert_tensors(ctx, e, dtype=torch.float32, modules=modules)
    return flatten_lora([t[m] for m in modules])


def flat_blocks(
    ctx: Context, experts: Sequence[Expert], groups: Iterable[Sequence[str]], *, device: str = "cpu"
) -> Iterator[torch.Tensor]:
    """Per group of modules, the (n, w) block of every expert's flattened slice of it (equal ranks)."""
    import torch

    for group in groups:
        width = sum(
            s.rank * (s.in_features + s.out_features) for m, s in experts[0].modules.items() if m in group
        )
        out = torch.empty(len(experts), width, dtype=torch.float32)
        for i, e in enumerate(experts):
            out[i] = _flat(ctx, e, group)
        yield out.to(device)


def delta_similarity(ctx: Context, experts: Sequence[Expert], *, device: str, budget: int) -> torch.Tensor:
    """(n, n) float64 exact cosine of the experts' ΔW, their factors read one group of modules at a
    time: half the budget holds a group's factors, ``delta_gram_matrix``'s stacked copies take the
    other half."""
    import torch

    from libstore.lowrank import similarity as sim

    widths = {
        m: max(e.modules[m].rank for e in experts) * (s.in_features + s.out_features)
        for m, s in experts[0].modules.items()
    }

    def groups() -> Iterator[list[list[tuple[Any, Any, float]]]]:
        for group in sim.module_groups(widths, len(experts), budget // 2):
            factors = []
            for e in experts:
                t = load_expert_tensors(ctx, e, dtype=torch.float32, modules=group, device=device)
                # clone: a loaded tensor may be a view of its memory-mapped file, and holding it would
                # keep the whole file mapped (resident) for as long as the group is held
                factors.append([(t[m][0].clone(), t[m][1].clone(), e.scale) for m in group])
            yield factors

    return sim.delta_similarity(groups())


# --- reading -----------------------------------------------------------------------------------


def get(ctx: Context, name: str) -> Clustering:
    """The clustering ``name`` with its staleness and linked cluster experts."""
    with ctx.catalog.read() as s:
        return cat.clustering(s, name, parse=parse_query)


def clusterings(ctx: Context) -> list[Clustering]:
    """Every recorded clustering, by name, with its staleness."""
    with ctx.catalog.read() as s:
        return cat.clusterings(s, parse=parse_query)


def stale_clusterings(ctx: Context) -> list[Clustering]:
    """The clusterings whose inputs changed, are gone, or gained experts (for ``libstore stale``)."""
    return [c for c in clusterings(ctx) if c.stale]


def export(ctx: Context, name: str, format: ExportFormat = "json") -> str:
    """The task list of every cluster, ready to train one cluster expert per cluster.

    ``json``: ``{"clustering", "base_model", "metric", "k", "query", "stale", "clusters": [{"index",
    "cluster" ("NAME:INDEX", what ``add --cluster`` takes), "tasks", "members"}]}``.
    ``csv``: header ``cluster,task``, one row per task of each cluster.
    """
    if format not in EXPORT_FORMATS:
        raise ValidationError(
            f"unknown export format {format!r}; formats are {', '.join(EXPORT_FORMATS)}", field="format"
        )
    c = get(ctx, name)
    rec = c.record
    if format == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["cluster", "task"])
        for cl in rec.clusters:
            for task in cl.tasks:
                writer.writerow([cl.index, task])
        return buf.getvalue()
    doc = {
        "clustering": rec.name,
        "base_model": rec.base_model,
        "metric": rec.metric,
        "k": rec.k,
        "query": rec.query,
        "stale": c.stale,
        "clusters": [
            {
                "index": cl.index,
                "cluster": f"{rec.name}:{cl.index}",
                "tasks": list(cl.tasks),
                "members": list(cl.members),
            }
            for cl in rec.clusters
        ],
    }
    return json.dumps(doc, indent=2) + "\n"


# --- changing ----------------------------------------------------------------------------------


def remove(ctx: Context, name: str, *, force: bool = False) -> list[str]:
    """Remove a clustering; returns the cluster experts that were linked to it.

    Refuses with :class:`InUseError` while cluster experts link to it unless ``force`` (their link
    is then cleared; the experts and their tasks stay).
    """
    with ctx.catalog.write() as s:
        return cat.delete_clustering(s, name, force=force)


# --- picture -----------------------------------------------------------------------------------


def plot(ctx: Context, name: str, path: str | os.PathLike[str], *, device: str | None = None) -> Path:
    """Write a PNG: the similarity matrix ordered by cluster (boundaries drawn) and a 2-D embedding
    (classical MDS of the similarity) coloured by cluster.

    The similarity is recomputed from the experts the run saw, with its metric and parameters; for a
    stale run that is their current content (the title says so), experts removed since are left out.
    Uses a bare ``matplotlib.figure.Figure`` (Agg), never pyplot.
    """
    import torch
    from matplotlib.figure import Figure

    from libstore.lowrank.partition import embed_2d

    c = get(ctx, name)
    rec = c.record
    present = [i for i in c.inputs if i.current_name is not None]
    if not present:
        raise ValidationError(f"every expert clustering {name!r} saw has been removed; nothing to plot")
    label_of = {m: cl.index for cl in rec.clusters for m in cl.members}
    experts = resolve_experts(ctx, [i.current_name for i in present if i.current_name is not None])
    labels = [label_of[i.input.name] for i in present]
    with torch.no_grad():
        S, _ = similarity_matrix(
            ctx,
            experts,
            metric="delta" if rec.metric == "delta" else "flat",
            keep=rec.params.get("keep") or 0.2,
            dim=rec.params.get("dim") or 64,
            device=device,
        )
    order = sorted(range(len(present)), key=lambda i: (labels[i], i))
    idx = torch.tensor(order)
    ordered = S[idx][:, idx].numpy()
    coords = embed_2d(S).numpy()
    n = len(present)

    fig = Figure(figsize=(13, 6))
    ax_m, ax_e = fig.subplots(1, 2)
    im = ax_m.imshow(ordered, vmin=-1.0, vmax=1.0, cmap="RdBu_r", interpolation="nearest")
    bounds = [i for i in range(1, n) if labels[order[i]] != labels[order[i - 1]]]
    for b in bounds:
        ax_m.axhline(b - 0.5, color="black", linewidth=0.6)
        ax_m.axvline(b - 0.5, color="black", linewidth=0.6)
    if n <= 60:
        names = [present[i].current_name or present[i].input.name for i in order]
        ax_m.set_xticks(range(n), names, rotation=90, fontsize=6)
        ax_m.set_yticks(range(n), names, fontsize=6)
    ax_m.set_title(f"{rec.metric} cosine, ordered by cluster")
    fig.colorbar(im, ax=ax_m, fraction=0.046, pad=0.04)
    cmap = _colormap(rec.k)
    for cl in range(rec.k):
        pts = [i for i in range(n) if labels[i] == cl]
        if not pts:
            continue
        xy = coords[pts]
        ax_e.scatter(xy[:, 0], xy[:, 1], s=18, color=cmap(cl), label=str(cl))
        cx, cy = xy.mean(axis=0)
        ax_e.annotate(str(cl), (cx, cy), fontsize=9, weight="bold", ha="center", va="center")
    ax_e.set_title("2-D embedding (MDS of the similarity)")
    if rec.k <= 20:
        ax_e.legend(title="cluster", fontsize=7, loc="best")
    note = " — STALE: recomputed from current weights" if c.stale else ""
    sil = f", silhouette {c.silhouette:.3f}" if c.silhouette is not None else ""
    fig.suptitle(f"{rec.name}: k={rec.k}, {n} experts{sil}{note}")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return out


def _colormap(k: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"].resampled(max(k, 1))
