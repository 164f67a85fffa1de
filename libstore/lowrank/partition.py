"""Clustering a similarity matrix: k-means on its rows, silhouettes, the choice of k, and embeddings.

What mttl's ``MBCWithCosSimTransform`` does after the similarity is built (k-means, k-means++, 10
restarts, on the *rows* of S), as pure functions on tensors: every random choice draws from a
``torch.Generator`` seeded by the caller, so a clustering recorded in the catalog can be reproduced bit
for bit. :func:`partition` is the production entry point (``libstore cluster`` records its result):
k-means on :func:`row_embedding` of S (exactly as far apart as S's rows, far fewer columns), k given or
chosen by silhouette, with per-cluster statistics. A silhouette that is undefined (fewer than 2 or more
than n − 1 clusters, as in scikit-learn) is ``None``. Similarities are float64 (n × n is small).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from libstore.errors import ValidationError
from libstore.lowrank.factors import check_int, fix_column_signs, float64_matrix, square_matrix

__all__ = [
    "DEFAULT_K_MAX",
    "MAX_ITER",
    "N_INIT",
    "ClusterStats",
    "KMeansResult",
    "Partition",
    "check_k",
    "choose_k",
    "cluster_similarity",
    "cluster_stats",
    "embed_2d",
    "kmeans",
    "partition",
    "row_embedding",
    "silhouette",
    "silhouette_samples",
]

Metric = Literal["similarity", "distance"]

N_INIT = 10
"""k-means restarts (mttl's default)."""
MAX_ITER = 300
"""Lloyd iterations per restart at most."""
DEFAULT_K_MAX = 20
"""Without a given k or range, k is chosen over 2..min(DEFAULT_K_MAX, n − 1)."""


# ---
# results


@dataclass(frozen=True)
class KMeansResult:
    """The best of ``n_init`` k-means runs.

    Attributes:
        labels: (n,) int64 cluster of each row, numbered by first appearance in row order (row 0 is in
            cluster 0, the first row not in cluster 0 is in cluster 1, ...), so equal partitions compare
            equal whatever the run.
        centers: (k, p) float64 cluster means, row c is the centre of cluster c.
        inertia: sum of squared distances of the rows to their centres.
        n_iter: Lloyd iterations of the winning run.
    """

    labels: Tensor
    centers: Tensor
    inertia: float
    n_iter: int


@dataclass(frozen=True)
class ClusterStats:
    """Cohesion and separation of one cluster under a similarity matrix.

    Attributes:
        label: the cluster's label as given.
        size: number of members.
        members: row indices of the members, ascending.
        within: mean similarity over ordered pairs of distinct members; ``None`` for a singleton.
        between: mean similarity from members to non-members; ``None`` when there is one cluster.
    """

    label: int
    size: int
    members: tuple[int, ...]
    within: float | None
    between: float | None


@dataclass(frozen=True)
class Partition:
    """A clustering of a similarity matrix (what ``libstore cluster`` records).

    Attributes:
        k: number of clusters.
        labels: cluster of each row (0..k−1, numbered by first appearance in row order).
        criterion: how k was chosen: ``{"name": "given"}``, or ``{"name": "silhouette", "k_range":
            [...], "scores": {"2": s, ...}}`` (a score is ``None`` where undefined), or ``{"name":
            "too few experts", ...}``; with the overall ``silhouette`` and the k-means ``inertia``.
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


# ---
# validation


def _labels(labels: Tensor, n: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValidationError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValidationError(f"labels must be integers, got dtype {labels.dtype}")
    return labels.detach().to(device="cpu", dtype=torch.int64)


def check_k(k: object, n: int) -> int:
    """``k`` as an int in 1..n, else :class:`ValidationError`."""
    k = check_int(k, "k", 1)
    if k > n:
        raise ValidationError(f"k={k} clusters asked of {n} expert(s); k can be at most {n}")
    return k


# ---
# k-means


def _sqdist(a: Tensor, b: Tensor, a_sq: Tensor, b_sq: Tensor) -> Tensor:
    """Squared Euclidean distances (len a, len b); clamped at 0 so rounding never makes them negative."""
    return (a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]).clamp_min_(0.0)


def _kmeans_pp(x: Tensor, x_sq: Tensor, k: int, gen: torch.Generator) -> Tensor:
    """Greedy k-means++ (scikit-learn's variant): each new centre is the best of 2 + ⌊ln k⌋ candidates
    drawn ∝ D². When all D² are 0 (identical rows) candidates are drawn uniformly instead. Returns indices."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    chosen = [int(torch.randint(n, (1,), generator=gen))]
    closest = _sqdist(x, x[chosen], x_sq, x_sq[chosen])[:, 0]
    for _ in range(1, k):
        if float(closest.sum()) > 0.0:
            cand = torch.multinomial(closest, trials, replacement=True, generator=gen)
        else:
            cand = torch.randint(n, (trials,), generator=gen)
        new_closest = torch.minimum(closest[None, :], _sqdist(x[cand], x, x_sq[cand], x_sq))
        best = int(new_closest.sum(dim=1).argmin())
        chosen.append(int(cand[best]))
        closest = new_closest[best]
    return torch.tensor(chosen)


def _fill_empty(labels: Tensor, d2: Tensor, k: int) -> Tensor:
    """Give every empty cluster the point farthest from its own centre among clusters of size ≥ 2.

    Deterministic (first index on ties) and always possible because n ≥ k; without it duplicate rows or a
    bad start would leave a centre with no points and a NaN mean.
    """
    counts = torch.bincount(labels, minlength=k)
    if bool((counts > 0).all()):
        return labels
    labels = labels.clone()
    own = d2.gather(1, labels[:, None])[:, 0].clone()
    for c in torch.nonzero(counts == 0).flatten().tolist():
        score = torch.where(counts[labels] > 1, own, torch.full_like(own, -1.0))
        i = int(score.argmax())
        counts[labels[i]] -= 1
        counts[c] = 1
        labels[i] = c
        own[i] = 0.0
    return labels


def _means(x: Tensor, labels: Tensor, k: int) -> Tensor:
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    return torch.zeros(k, x.shape[1], dtype=x.dtype).index_add_(0, labels, x) / counts[:, None]


def _lloyd(
    x: Tensor, x_sq: Tensor, centers: Tensor, max_iter: int, tol_abs: float
) -> tuple[Tensor, Tensor, int]:
    k = centers.shape[0]
    prev: Tensor | None = None
    for it in range(1, max_iter + 1):
        d2 = _sqdist(x, centers, x_sq, (centers * centers).sum(1))
        labels = _fill_empty(d2.argmin(dim=1), d2, k)
        new = _means(x, labels, k)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if prev is not None and torch.equal(labels, prev):
            return labels, centers, it  # a fixed point: centres are the means of their own assignment
        if shift <= tol_abs:
            break
        prev = labels
    # stopped on tol or max_iter: one more assignment so labels are the nearest centres of the result
    d2 = _sqdist(x, centers, x_sq, (centers * centers).sum(1))
    labels = _fill_empty(d2.argmin(dim=1), d2, k)
    return labels, _means(x, labels, k), it


def _canonical(labels: Tensor, centers: Tensor) -> tuple[Tensor, Tensor]:
    """Renumber clusters by first appearance in row order (and permute the centres to match)."""
    k = centers.shape[0]
    first = torch.full((k,), labels.shape[0], dtype=torch.int64)
    first.scatter_reduce_(0, labels, torch.arange(labels.shape[0]), reduce="amin")
    order = torch.argsort(first)  # old ids in order of first appearance
    new_id = torch.empty(k, dtype=torch.int64)
    new_id[order] = torch.arange(k)
    return new_id[labels], centers[order]


def kmeans(
    x: Tensor,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 10,
    max_iter: int = 300,
    tol: float = 1e-6,
) -> KMeansResult:
    """Lloyd's k-means on the rows of x (n, p): k-means++ starts, best of ``n_init`` runs by inertia.

    Deterministic for a seed (one local generator feeds all runs; earlier run wins ties). A run stops at a
    fixed point (labels unchanged), when the squared centre shift drops to ``tol`` × the mean per-column
    variance of x (scikit-learn's scaling of ``tol``), or after ``max_iter`` iterations. Every cluster is
    non-empty. k > n raises ``ValidationError``.
    """
    xs = float64_matrix(x, "x")
    n = xs.shape[0]
    k = check_k(k, n)
    n_init = check_int(n_init, "n_init", 1)
    max_iter = check_int(max_iter, "max_iter", 1)
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValidationError(f"tol must be a number >= 0, got {tol!r}")
    gen = torch.Generator().manual_seed(check_int(seed, "seed", -(2**63)))
    x_sq = (xs * xs).sum(1)
    tol_abs = float(tol) * float(xs.var(dim=0, unbiased=False).mean())
    best: tuple[float, Tensor, Tensor, int] | None = None
    for _ in range(n_init):
        start = xs[_kmeans_pp(xs, x_sq, k, gen)]
        labels, centers, n_iter = _lloyd(xs, x_sq, start, max_iter, tol_abs)
        inertia = float(((xs - centers[labels]) ** 2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centers, n_iter)
    assert best is not None
    labels, centers = _canonical(best[1], best[2])
    return KMeansResult(labels=labels, centers=centers, inertia=best[0], n_iter=best[3])


def cluster_similarity(
    S: Tensor, k: int, *, seed: int = 0, n_init: int = 10, max_iter: int = 300
) -> KMeansResult:
    """k-means on the rows of a similarity matrix — what mttl's ``MBCWithCosSimTransform`` does: each
    expert is described by its similarity profile to all experts, so two experts cluster together when
    they resemble the same others, not only each other."""
    return kmeans(square_matrix(S, "S"), k, seed=seed, n_init=n_init, max_iter=max_iter)


# ---
# quality of a clustering, choice of k, embeddings


def _distance(S_or_D: Tensor, metric: Metric) -> Tensor:
    m = square_matrix(S_or_D, "S_or_D")
    if metric == "similarity":
        return 1.0 - m  # cosine distance, so silhouette(S, ·) == sklearn's metric="cosine" on the features
    if metric == "distance":
        return m
    raise ValidationError(f"metric must be 'similarity' or 'distance', got {metric!r}")


def silhouette_samples(S_or_D: Tensor, labels: Tensor, *, metric: Metric = "similarity") -> Tensor | None:
    """Silhouette of each row, (n,) float64, or ``None`` when undefined (fewer than 2 or more than n − 1
    distinct labels, where scikit-learn raises).

    s = (b − a) / max(a, b) with a the mean distance to the other members of its cluster and b the mean
    distance to the nearest other cluster; a singleton scores 0 and so does a = b = 0 (identical experts),
    as in scikit-learn. With ``metric="similarity"`` distances are 1 − S. The diagonal is ignored.
    """
    dist = _distance(S_or_D, metric)
    n = dist.shape[0]
    uniq, inv = torch.unique(_labels(labels, n), return_inverse=True)
    L = uniq.shape[0]
    if L < 2 or n - 1 < L:
        return None
    dist.fill_diagonal_(0.0)
    onehot = torch.nn.functional.one_hot(inv, L).to(torch.float64)
    sums = dist @ onehot
    sizes = onehot.sum(0)
    own = sizes[inv]
    a = sums.gather(1, inv[:, None])[:, 0] / (own - 1).clamp_min(1)
    means = (sums / sizes).scatter_(1, inv[:, None], math.inf)
    b = means.min(dim=1).values
    den = torch.maximum(a, b)
    s = torch.where(den > 0, (b - a) / den.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(a))
    return torch.where(own > 1, s, torch.zeros_like(s))


def silhouette(S_or_D: Tensor, labels: Tensor, *, metric: Metric = "similarity") -> float | None:
    """Mean silhouette in [−1, 1] (higher: tighter, better separated clusters), or ``None`` when undefined
    (1 cluster, e.g. one expert; or every expert its own cluster). See ``silhouette_samples``."""
    s = silhouette_samples(S_or_D, labels, metric=metric)
    return None if s is None else float(s.mean())


def choose_k(
    S: Tensor, k_range: Iterable[int], *, seed: int = 0, n_init: int = 10
) -> tuple[int, dict[int, float | None]]:
    """Pick k by the best mean silhouette (under 1 − S) of ``cluster_similarity(S, k)`` over ``k_range``.

    Returns (k, {k: score}); a score is ``None`` where the silhouette is undefined (k = 1, k = n). Ties go
    to the smaller k; if no k has a defined score (e.g. n ≤ 2) the smallest k is returned. Any k > n raises.
    """
    sim = square_matrix(S, "S")
    n = sim.shape[0]
    ks = sorted({check_k(k, n) for k in k_range})
    if not ks:
        raise ValidationError("k_range is empty; give at least one k, e.g. range(2, 11)")
    scores = {k: silhouette(sim, cluster_similarity(sim, k, seed=seed, n_init=n_init).labels) for k in ks}
    defined = {k: s for k, s in scores.items() if s is not None}
    best = max(defined, key=lambda k: (defined[k], -k)) if defined else ks[0]
    return best, scores


def cluster_stats(S: Tensor, labels: Tensor) -> list[ClusterStats]:
    """Size, within- and between-cluster mean similarity of each cluster, in ascending label order.

    Done with block sums (onehotᵀ·S·onehot), O(n²·L), so a thousand experts in hundreds of clusters is
    instant; the diagonal (self-similarity) is excluded from ``within``.
    """
    sim = square_matrix(S, "S")
    n = sim.shape[0]
    uniq, inv = torch.unique(_labels(labels, n), return_inverse=True)
    onehot = torch.nn.functional.one_hot(inv, uniq.shape[0]).to(torch.float64)
    block = onehot.T @ sim @ onehot
    diag = onehot.T @ sim.diagonal()
    sizes = onehot.sum(0)
    out = []
    for c in range(uniq.shape[0]):
        size = int(sizes[c])
        within = (float(block[c, c] - diag[c]) / (size * (size - 1))) if size > 1 else None
        others = n - size
        between = float(block[c].sum() - block[c, c]) / (size * others) if others > 0 else None
        members = tuple(torch.nonzero(inv == c).flatten().tolist())
        out.append(ClusterStats(int(uniq[c]), size, members, within, between))
    return out


def embed_2d(S: Tensor) -> Tensor:
    """2-D coordinates of the experts for a plot, (n, 2) float64: classical MDS.

    With cosine similarity S of unit vectors, squared distances are 2 − 2S, so MDS reduces to the top two
    eigenvectors of the double-centred S (= PCA of the features), scaled by √eigenvalue. Negative
    eigenvalues (S not a Gram matrix) are clipped to 0; signs are fixed (largest-magnitude coordinate of
    each axis positive) so the same library always draws the same picture; one expert sits at (0, 0).
    """
    sim = square_matrix(S, "S")
    sim = (sim + sim.T) / 2
    n = sim.shape[0]
    centred = sim - sim.mean(0, keepdim=True) - sim.mean(1, keepdim=True) + sim.mean()
    evals, evecs = torch.linalg.eigh(centred)
    r = min(2, n)
    order = torch.arange(n - 1, n - 1 - r, -1)
    coords = fix_column_signs(evecs[:, order] * evals[order].clamp_min(0).sqrt())
    if r < 2:
        coords = torch.cat([coords, torch.zeros(n, 2 - r, dtype=coords.dtype)], dim=1)
    return coords


def row_embedding(S: Tensor, *, rtol: float = 1e-9) -> Tensor:
    """Y (n, r) whose rows are as far apart as the rows of the symmetric S: ‖Yᵢ − Yⱼ‖ = ‖Sᵢ − Sⱼ‖,
    and means of rows map the same way, so k-means on Y and on S's rows make the same choices.

    S = U Λ Uᵀ gives Sᵢ − Sⱼ = U Λ (uᵢ − uⱼ), so Y = U Λ; eigenvalues below ``rtol`` × the largest
    (rounding noise of a low-rank S) are dropped, which moves distances by less than that. The sign
    of each column is fixed so the embedding is reproducible.
    """
    sim = square_matrix(S, "S")
    evals, evecs = torch.linalg.eigh((sim + sim.T) / 2)
    big = evals.abs() > evals.abs().max() * rtol
    if not bool(big.any()):  # S = 0: every row the same point
        return torch.zeros(sim.shape[0], 1, dtype=torch.float64)
    return fix_column_signs(evecs[:, big] * evals[big])


def partition(
    S: Tensor,
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
    sim = square_matrix(S, "S")
    n = int(sim.shape[0])
    Y = row_embedding(sim)
    # kmeans scales tol by the mean per-column variance; Y has the total variance of S's rows over
    # fewer columns, so scale tol back to stop exactly where k-means on S's rows stops.
    tol = 1e-6 * Y.shape[1] / n

    def run(kk: int) -> KMeansResult:
        return kmeans(Y, kk, seed=seed, n_init=n_init, max_iter=MAX_ITER, tol=tol)

    criterion: dict[str, Any]
    if k is not None:
        criterion = {"name": "given"}
        km = run(check_k(k, n))
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
            scores = {kk: silhouette(sim, r.labels) for kk, r in runs.items()}
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
    samples = silhouette_samples(sim, labels)
    overall = None if samples is None else float(samples.mean())
    stats = []
    for st in cluster_stats(sim, labels):
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
