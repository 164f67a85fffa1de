"""MBC task clustering of stored experts, recorded in the catalog.

One run (:func:`cluster`) selects experts by a query, builds their similarity matrix, runs k-means on
its rows (k given, or chosen by silhouette), and records everything in one transaction: the parameters,
the criterion with every score, the sha256 of every expert it saw, and per cluster its members, tasks
and within/between similarity and silhouette. The math is in ``libstore.lowrank.clustering`` (MBC,
k-means, silhouette) and ``libstore.lowrank.similarity`` (exact ΔW cosine).

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

**k-means** runs on an isometric embedding of the similarity's rows (:func:`row_embedding`): the same
distances and means as mttl's k-means on the rows of S, so the same choices, but for the flat metric
on ≤ ``dim`` columns instead of n.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libstore.catalog import clusterings as cat
from libstore.catalog import repo
from libstore.catalog.clusterings import Cluster, Clustering, ClusteringInput
from libstore.errors import (
    AlreadyExistsError,
    IncompatibleExpertsError,
    ValidationError,
)
from libstore.ops.context import Context
from libstore.ops.prototypes import default_device, resolve_experts
from libstore.ops.query import format_query, parse_query
from libstore.ops.tensors import check_compatible, load_expert_tensors
from libstore.store.adapter import validate_name
from libstore.types import Expert, ExpertQuery

if TYPE_CHECKING:
    import torch

__all__ = [
    "Cluster",
    "Clustering",
    "ClusteringInput",
    "Partition",
    "cluster",
    "clusterings",
    "export",
    "get",
    "partition",
    "plot",
    "remove",
    "row_embedding",
    "similarity_matrix",
    "stale_clusterings",
]

METHOD = "mbc"
METHOD_VERSION = 1
METRICS = ("flat", "delta")
EXPORT_FORMATS = ("json", "csv")
DEFAULT_QUERY = "kind=task"
DEFAULT_K_MAX = 20
N_INIT = 10
MAX_ITER = 300
#: Expert tensors held at once while building a similarity matrix (bytes); beyond it, stream.
STREAM_BYTES = 256 << 20

ExpertsArg = str | ExpertQuery | Sequence[str] | None


@dataclass(frozen=True)
class Partition:
    """A clustering of a similarity matrix, before it is recorded.

    Attributes:
        k: number of clusters.
        labels: cluster of each row (0..k−1, numbered by first appearance in row order).
        criterion: how k was chosen (see ``Clustering.criterion``), with the overall ``silhouette``
            and the k-means ``inertia``.
        silhouette: mean silhouette (``None`` where undefined: k = 1 or k = n).
        stats: per cluster ``{"within", "between", "silhouette"}``, by index.
        inertia: k-means inertia of the winning run.
    """

    k: int
    labels: tuple[int, ...]
    criterion: dict[str, Any]
    silhouette: float | None
    stats: tuple[dict[str, Any], ...]
    inertia: float


# --- running -----------------------------------------------------------------------------------


def cluster(
    ctx: Context,
    experts: ExpertsArg = DEFAULT_QUERY,
    *,
    k: int | None = None,
    metric: str = "flat",
    seed: int = 0,
    name: str | None = None,
    keep: float = 0.2,
    dim: int = 64,
    k_range: Iterable[int] | None = None,
    n_init: int = N_INIT,
    device: str | None = None,
) -> Clustering:
    """Cluster the experts ``experts`` selects and record the run as ``name``.

    Args:
        experts: a query (``"kind=task"``), an ``ExpertQuery`` or a list of expert names.
        k: number of clusters; ``None`` chooses it by the best mean silhouette over ``k_range``
            (default 2..min(20, n − 1)); every score is recorded.
        metric: ``flat`` (mttl's MBC) or ``delta`` (exact cosine of ΔW); see the module doc.
        seed: k-means seed; the same inputs and seed give the same clustering.
        name: the clustering's name (default ``mbc-k<k>``, ``mbc-delta-k<k>`` for delta).
        keep, dim: flat metric: fraction of entries kept per expert, SVD dimensions.
        n_init: k-means restarts.
        device: delta metric: where ΔW inner products run (default cuda if available, else cpu).
    """
    import torch

    _check_params(metric=metric, keep=keep, dim=dim, n_init=n_init, seed=seed)
    query = _as_query(experts)
    query_text = format_query(query)
    if name is not None:
        validate_name(name)
        with ctx.catalog.read() as s:
            if cat.clustering_exists(s, name):
                raise AlreadyExistsError(
                    f"a clustering named {name!r} already exists; pass another --name, or remove "
                    f"it first: libstore clusters rm {name}"
                )
    chosen = resolve_experts(ctx, query_text)  # the canonical text: errors quote the query
    _check_experts(chosen, metric)
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
    members: dict[int, list[int]] = {}
    for i, label in enumerate(part.labels):
        members.setdefault(label, []).append(i)
    new = [
        cat.NewCluster(
            members=tuple(members[c]),
            tasks=tuple(sorted({t for i in members[c] for t in (chosen[i].tasks or (chosen[i].name,))})),
            stats=part.stats[c],
        )
        for c in range(part.k)
    ]
    with ctx.catalog.write() as s:
        row = cat.insert_clustering(
            s,
            name=name,
            base=repo.base_row(s, chosen[0].base_model),
            method=METHOD,
            metric=metric,
            k=part.k,
            seed=seed,
            params=params,
            criterion=part.criterion,
            query=query_text,
            inputs=[(e.name, e.sha256) for e in chosen],
            clusters=new,
        )
        return cat.to_clustering(s, row, added=cat.added_experts(s, row, query))


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
    if metric not in METRICS:
        raise ValidationError(f"unknown metric {metric!r}; metrics are {', '.join(METRICS)}")
    if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0.0 < keep <= 1.0:
        raise ValidationError(f"keep must be a fraction in (0, 1], e.g. 0.2; got {keep!r}")
    for label, value, low in (("dim", dim, 1), ("n_init", n_init, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValidationError(f"{label} must be an integer >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not -(2**31) <= seed < 2**31:
        raise ValidationError(f"seed must be a 32-bit integer (the catalog stores it as one), got {seed!r}")


def _check_experts(experts: Sequence[Expert], metric: str) -> None:
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

    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValidationError(f"k must be a positive integer, got {value!r}")
        if value > n:
            raise ValidationError(f"k={value} but only {n} expert(s) match {query!r}; k can be at most {n}")
        return value

    if k is not None:
        if k_range is not None:
            raise ValidationError("pass k or k_range, not both")
        return [check(k)]
    if k_range is not None:
        ks = sorted({check(v) for v in k_range})
        if not ks:
            raise ValidationError("k_range is empty; give at least one k, e.g. 2..10")
        return ks
    return list(range(2, min(DEFAULT_K_MAX, n - 1) + 1))


# --- the math, from the store ------------------------------------------------------------------


def similarity_matrix(
    ctx: Context,
    experts: Sequence[Expert],
    *,
    metric: str = "flat",
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

    budget_bytes = STREAM_BYTES if budget_bytes is None else budget_bytes
    if metric == "flat":
        S, fdim = _flat_similarity(ctx, experts, keep=keep, dim=dim, budget=budget_bytes)
    elif metric == "delta":
        S, fdim = _delta_similarity(ctx, experts, device=default_device(device), budget=budget_bytes), None
    else:
        raise ValidationError(f"unknown metric {metric!r}; metrics are {', '.join(METRICS)}")
    return torch.round(S, decimals=12), fdim


def _module_groups(widths: dict[str, int], n: int, budget: int) -> list[list[str]]:
    """Modules in name order, cut into consecutive groups whose n experts' float32 slices fit ``budget``."""
    groups: list[list[str]] = [[]]
    used = 0
    for m in sorted(widths):
        size = n * widths[m] * 4
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(m)
        used += size
    return groups


def _flat_similarity(
    ctx: Context, experts: Sequence[Expert], *, keep: float, dim: int, budget: int
) -> tuple[torch.Tensor, int]:
    import torch

    from libstore.lowrank.clustering import (
        cosine_matrix,
        features_from_gram,
        keep_thresholds,
        sparsified_gram,
    )
    from libstore.lowrank.similarity import flatten_lora

    n = len(experts)
    shapes = experts[0].modules
    widths = {m: s.rank * (s.in_features + s.out_features) for m, s in shapes.items()}
    modules = sorted(widths)
    d = sum(widths.values())
    groups = _module_groups(widths, n, budget)
    # sparsified_gram's own working buffer: a fraction of the budget, wide enough for BLAS speed
    block_cols = max(1024, budget // 8 // (4 * n))

    # Pass 1: each expert's magnitude threshold (it needs the whole row); the first group's columns
    # are kept on the way, so a library that fits the budget is read once.
    first = torch.empty(n, sum(widths[m] for m in groups[0]), dtype=torch.float32)
    thresholds = torch.empty(n, dtype=torch.float64)
    for i, e in enumerate(experts):
        t = load_expert_tensors(ctx, e, dtype=torch.float32)
        flat = flatten_lora([t[m] for m in modules])  # modules sorted by name, A then B
        thresholds[i] = keep_thresholds(flat[None], keep)[0]
        first[i] = flat[: first.shape[1]]
        del t, flat
    gram = sparsified_gram(first, thresholds, block_cols=block_cols)
    del first
    # Pass 2: the Gram matrix of the sparsified rows, one further group of modules at a time.
    for group in groups[1:]:
        block = torch.empty(n, sum(widths[m] for m in group), dtype=torch.float32)
        for i, e in enumerate(experts):
            t = load_expert_tensors(ctx, e, dtype=torch.float32, modules=group)
            block[i] = flatten_lora([t[m] for m in group])
            del t
        gram += sparsified_gram(block, thresholds, block_cols=block_cols)
        del block
    features = features_from_gram(gram, min(dim, d))
    return cosine_matrix(features), int(features.shape[1])


def _delta_similarity(ctx: Context, experts: Sequence[Expert], *, device: str, budget: int) -> torch.Tensor:
    import torch

    from libstore.lowrank.similarity import delta_cosine_matrix, frobenius_inner

    n = len(experts)
    shapes = experts[0].modules
    widths = {
        m: max(e.modules[m].rank for e in experts) * (s.in_features + s.out_features)
        for m, s in shapes.items()
    }
    # half the budget for the factors held, half for delta_cosine_matrix's stacked copies and blocks
    groups = _module_groups(widths, n, budget // 2)

    def load(group: list[str]) -> list[list[tuple[torch.Tensor, torch.Tensor, float]]]:
        out = []
        for e in experts:
            t = load_expert_tensors(ctx, e, dtype=torch.float32, modules=group, device=device)
            # clone: a loaded tensor may be a view of its memory-mapped file, and holding it would
            # keep the whole file mapped (resident) for as long as the group is held
            out.append([(t[m][0].clone(), t[m][1].clone(), e.scale) for m in group])
            del t
        return out

    if len(groups) == 1:
        return delta_cosine_matrix(load(groups[0])).to("cpu", torch.float64)
    # ⟨ΔWᵢ, ΔWⱼ⟩ summed group by group: the group's cosine times the group's norms.
    gram = torch.zeros(n, n, dtype=torch.float64)
    for group in groups:
        factors = load(group)
        cos = delta_cosine_matrix(factors).to("cpu", torch.float64)
        sq = torch.zeros(n, dtype=torch.float64)
        for j in range(len(group)):
            mods = [f[j] for f in factors]
            if len({a.shape for a, _, _ in mods}) == 1:  # equal ranks: one batched call
                A = torch.stack([a for a, _, _ in mods])
                B = torch.stack([b for _, b, _ in mods])
                s = torch.tensor([sc for _, _, sc in mods], dtype=A.dtype, device=A.device)
                sq += frobenius_inner(A, B, s, A, B, s).to("cpu", torch.float64)
            else:
                sq += torch.tensor(
                    [float(frobenius_inner(a, b, sc, a, b, sc)) for a, b, sc in mods], dtype=torch.float64
                )
        norm = sq.clamp_min(0).sqrt()
        gram += cos * norm[:, None] * norm[None, :]
        del factors
    norms = gram.diagonal().clamp_min(0).sqrt()
    nz = norms > 0
    denom = torch.where(nz, norms, torch.ones_like(norms))
    S = gram / (denom[:, None] * denom[None, :])
    S = torch.where(nz[:, None] & nz[None, :], S, torch.zeros_like(S))
    S = ((S + S.T) / 2).clamp_(-1.0, 1.0)
    S.fill_diagonal_(1.0)
    return S


def partition(
    S: torch.Tensor,
    *,
    k: int | None = None,
    k_range: Iterable[int] | None = None,
    seed: int = 0,
    n_init: int = N_INIT,
) -> Partition:
    """k-means on the rows of the similarity matrix ``S`` (mttl's ``MBCWithCosSimTransform``).

    With ``k`` given it is used; otherwise k is the best mean silhouette (under 1 − S) over
    ``k_range`` (default 2..min(20, n − 1); ties to the smaller k); with n ≤ 2 experts (no k has a
    silhouette) everything is one cluster.

    k-means runs on :func:`row_embedding` of S, whose rows are exactly as far apart as the rows of S,
    so it makes the choices ``cluster_similarity(S, k)`` makes at a fraction of the cost (the flat
    metric's S has rank ≤ ``dim``: 64 columns instead of n).
    """
    from libstore.lowrank.clustering import (
        cluster_stats,
        kmeans,
        silhouette,
        silhouette_samples,
    )

    n = int(S.shape[0])
    Y = row_embedding(S)
    # kmeans scales tol by the mean per-column variance; Y has the total variance of S's rows over
    # fewer columns, so scale tol back to stop exactly where k-means on S's rows stops.
    tol = 1e-6 * Y.shape[1] / n

    def run(kk: int) -> Any:
        return kmeans(Y, kk, seed=seed, n_init=n_init, max_iter=MAX_ITER, tol=tol)

    criterion: dict[str, Any]
    if k is not None:
        criterion = {"name": "given"}
        km = run(k)
    else:
        ks = sorted(set(k_range)) if k_range is not None else list(range(2, min(DEFAULT_K_MAX, n - 1) + 1))
        if not ks:
            k = 1
            criterion = {
                "name": "too few experts",
                "note": f"{n} expert(s): a silhouette needs at least 3, so all are one cluster",
            }
            km = run(k)
        else:
            runs = {kk: run(kk) for kk in ks}
            scores = {kk: silhouette(S, r.labels) for kk, r in runs.items()}
            defined = {kk: v for kk, v in scores.items() if v is not None}
            k = max(defined, key=lambda kk: (defined[kk], -kk)) if defined else ks[0]
            km = runs[k]
            criterion = {
                "name": "silhouette",
                "k_range": ks,
                "scores": {str(kk): v for kk, v in scores.items()},
            }
            if not defined:
                criterion["note"] = "no k in the range has a defined silhouette; took the smallest"
            elif defined[k] <= 0:
                criterion["note"] = "best silhouette <= 0: the experts show no cluster structure"
    labels = km.labels
    samples = silhouette_samples(S, labels)
    overall = None if samples is None else float(samples.mean())
    stats = []
    for st in cluster_stats(S, labels):
        sil = None if samples is None else float(samples[list(st.members)].mean())
        stats.append({"within": st.within, "between": st.between, "silhouette": sil})
    criterion["silhouette"] = overall
    criterion["inertia"] = float(km.inertia)
    return Partition(
        k=int(k),
        labels=tuple(int(x) for x in labels.tolist()),
        criterion=criterion,
        silhouette=overall,
        stats=tuple(stats),
        inertia=float(km.inertia),
    )


def row_embedding(S: torch.Tensor, *, rtol: float = 1e-9) -> torch.Tensor:
    """Y (n, r) whose rows are as far apart as the rows of the symmetric S: ‖Yᵢ − Yⱼ‖ = ‖Sᵢ − Sⱼ‖,
    and means of rows map the same way, so k-means on Y and on S's rows make the same choices.

    S = U Λ Uᵀ gives Sᵢ − Sⱼ = U Λ (uᵢ − uⱼ), so Y = U Λ; eigenvalues below ``rtol`` × the largest
    (rounding noise of a low-rank S) are dropped, which moves distances by less than that. The sign
    of each column is fixed so the embedding is reproducible.
    """
    import torch

    sym = (S + S.T) / 2
    evals, evecs = torch.linalg.eigh(sym.to(torch.float64))
    big = evals.abs() > evals.abs().max() * rtol
    if not bool(big.any()):  # S = 0: every row the same point
        return torch.zeros(S.shape[0], 1, dtype=torch.float64)
    y = evecs[:, big] * evals[big]
    idx = y.abs().argmax(dim=0)
    sign = torch.sign(y[idx, torch.arange(y.shape[1])])
    return y * torch.where(sign == 0, torch.ones_like(sign), sign)


# --- reading -----------------------------------------------------------------------------------


def get(ctx: Context, name: str) -> Clustering:
    with ctx.catalog.read() as s:
        row = cat.clustering_row(s, name)
        return cat.to_clustering(s, row, added=cat.added_experts(s, row, parse_query(row.query)))


def clusterings(ctx: Context) -> list[Clustering]:
    """Every recorded clustering, by name, with its staleness."""
    with ctx.catalog.read() as s:
        return [
            cat.to_clustering(s, row, added=cat.added_experts(s, row, parse_query(row.query)))
            for row in cat.clustering_rows(s)
        ]


def stale_clusterings(ctx: Context) -> list[Clustering]:
    """The clusterings whose inputs changed, are gone, or gained experts (for ``libstore stale``)."""
    return [c for c in clusterings(ctx) if c.stale]


def export(ctx: Context, name: str, format: str = "json") -> str:
    """The task list of every cluster, ready to train one cluster expert per cluster.

    ``json``: ``{"clustering", "base_model", "metric", "k", "query", "stale", "clusters": [{"index",
    "cluster" ("NAME:INDEX", what ``add --cluster`` takes), "tasks", "members"}]}``.
    ``csv``: header ``cluster,task``, one row per task of each cluster.
    """
    if format not in EXPORT_FORMATS:
        raise ValidationError(f"unknown export format {format!r}; formats are {', '.join(EXPORT_FORMATS)}")
    c = get(ctx, name)
    if format == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["cluster", "task"])
        for cl in c.clusters:
            for task in cl.tasks:
                writer.writerow([cl.index, task])
        return buf.getvalue()
    doc = {
        "clustering": c.name,
        "base_model": c.base_model,
        "metric": c.metric,
        "k": c.k,
        "query": c.query,
        "stale": c.stale,
        "clusters": [
            {
                "index": cl.index,
                "cluster": f"{c.name}:{cl.index}",
                "tasks": list(cl.tasks),
                "members": list(cl.members),
            }
            for cl in c.clusters
        ],
    }
    return json.dumps(doc, indent=2) + "\n"


# --- changing ----------------------------------------------------------------------------------


def remove(ctx: Context, name: str, *, force: bool = False) -> list[str]:
    """Remove a clustering; returns the cluster experts that were linked to it.

    Refuses while cluster experts link to it unless ``force`` (their link is then cleared; the
    experts and their tasks stay).
    """
    with ctx.catalog.write() as s:
        row = cat.clustering_row(s, name)
        linked = cat.linked_experts(s, row)
        if linked and not force:
            shown = ", ".join(linked[:5]) + (" ..." if len(linked) > 5 else "")
            raise ValidationError(
                f"cluster experts are linked to {name!r} ({shown}); pass --force to remove it "
                f"anyway (the experts stay, their link to the cluster is cleared)"
            )
        cat.delete_clustering(s, row)
        return linked


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

    from libstore.lowrank.clustering import embed_2d

    c = get(ctx, name)
    present = [i for i in c.inputs if i.current_name is not None]
    if not present:
        raise ValidationError(f"every expert clustering {name!r} saw has been removed; nothing to plot")
    label_of = {m: cl.index for cl in c.clusters for m in cl.members}
    with ctx.catalog.read() as s:
        experts = [
            repo.to_expert(s, repo.expert_row(s, i.current_name), with_lineage=False)
            for i in present
            if i.current_name is not None
        ]
    labels = [label_of[i.name] for i in present]
    with torch.no_grad():
        S, _ = similarity_matrix(
            ctx,
            experts,
            metric=c.metric,
            keep=c.params.get("keep") or 0.2,
            dim=c.params.get("dim") or 64,
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
        names = [present[i].current_name or present[i].name for i in order]
        ax_m.set_xticks(range(n), names, rotation=90, fontsize=6)
        ax_m.set_yticks(range(n), names, fontsize=6)
    ax_m.set_title(f"{c.metric} cosine, ordered by cluster")
    fig.colorbar(im, ax=ax_m, fraction=0.046, pad=0.04)
    cmap = _colormap(c.k)
    for cl in range(c.k):
        pts = [i for i in range(n) if labels[i] == cl]
        if not pts:
            continue
        xy = coords[pts]
        ax_e.scatter(xy[:, 0], xy[:, 1], s=18, color=cmap(cl), label=str(cl))
        cx, cy = xy.mean(axis=0)
        ax_e.annotate(str(cl), (cx, cy), fontsize=9, weight="bold", ha="center", va="center")
    ax_e.set_title("2-D embedding (MDS of the similarity)")
    if c.k <= 20:
        ax_e.legend(title="cluster", fontsize=7, loc="best")
    note = " — STALE: recomputed from current weights" if c.stale else ""
    sil = f", silhouette {c.silhouette:.3f}" if c.silhouette is not None else ""
    fig.suptitle(f"{c.name}: k={c.k}, {n} experts{sil}{note}")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return out


def _colormap(k: int) -> Any:
    from matplotlib import colormaps

    return colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"].resampled(max(k, 1))
