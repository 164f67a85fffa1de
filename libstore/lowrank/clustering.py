"""MBC (model-based clustering) of experts, as pure functions on tensors.

The paper's method (Ostapenko et al., arXiv 2405.11157; microsoft/mttl,
``mttl/models/library/library_transforms.py``: ``SVDEmbeddingTransform`` + ``MBCWithCosSimTransform``):
flatten each expert's LoRA parameters into one row, keep the largest fraction of each row by magnitude,
reduce with a truncated SVD to 64 dimensions, L2-normalise, take the cosine-similarity matrix and run
k-means (k-means++, 10 restarts) on its *rows*. mttl uses scikit-learn's randomized ``TruncatedSVD`` and
``KMeans``; libstore computes the SVD exactly (through the n × n Gram matrix when d ≫ n, so n = 1000
experts of a few million parameters fit in memory) and implements k-means itself, seeded by a local
generator, so a clustering recorded in the catalog can be reproduced bit for bit.

Conventions: similarities and features are float64 (they are small: n × n, n × dim); every random
choice draws from a ``torch.Generator`` seeded by the caller, never from global RNG state; a silhouette
that is undefined (fewer than 2 or more than n − 1 clusters, as in scikit-learn) is ``None``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from libstore.errors import ValidationError

__all__ = [
    "ClusterStats",
    "KMeansResult",
    "MBCResult",
    "choose_k",
    "cluster_similarity",
    "cluster_stats",
    "cosine_matrix",
    "embed_2d",
    "features_from_gram",
    "keep_count",
    "keep_thresholds",
    "kmeans",
    "mbc",
    "mbc_features",
    "silhouette",
    "silhouette_samples",
    "sparsified_gram",
]

Metric = Literal["similarity", "distance"]

# Working-buffer budget for the chunked passes over d (bytes). Big enough for BLAS to run at full speed
# (syrk with ≥ 16k columns), small enough to stay far below the size of the input itself.
_BLOCK_BYTES = 128 * 2**20


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
class MBCResult:
    """One MBC run end to end: features (n, p), cosine similarity (n, n) and the k-means clustering."""

    features: Tensor
    similarity: Tensor
    clustering: KMeansResult


# ---
# validation


def _matrix(x: Tensor, name: str) -> Tensor:
    """A finite, non-empty 2-D real tensor as float64 (NaN/inf would silently poison every distance)."""
    if not isinstance(x, Tensor):
        raise ValidationError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValidationError(f"{name} must be a non-empty 2-D tensor, got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValidationError(f"{name} must be real-valued, got dtype {x.dtype}")
    x = x.detach().to(device="cpu", dtype=torch.float64, copy=True)  # callers' tensors are never mutated
    if not bool(torch.isfinite(x).all()):
        raise ValidationError(f"{name} contains NaN or infinite values; fix or drop those experts first")
    return x


def _square(x: Tensor, name: str) -> Tensor:
    x = _matrix(x, name)
    if x.shape[0] != x.shape[1]:
        raise ValidationError(f"{name} must be square (n, n), got shape {tuple(x.shape)}")
    return x


def _labels(labels: Tensor, n: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValidationError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValidationError(f"labels must be integers, got dtype {labels.dtype}")
    return labels.detach().to(device="cpu", dtype=torch.int64)


def _int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValidationError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValidationError(f"{name} must be an integer, got {value!r}") from None
    if v < minimum:
        raise ValidationError(f"{name} must be at least {minimum}, got {v}")
    return v


def _k(k: object, n: int) -> int:
    k = _int(k, "k", 1)
    if k > n:
        raise ValidationError(f"k={k} clusters asked of {n} expert(s); k can be at most {n}")
    return k


# ---
# MBC features: sparsify, exact truncated SVD, normalise


def keep_count(d: int, keep: float) -> int:
    """How many entries of a length-``d`` row MBC keeps: ⌈keep·d⌉, at least 1.

    mttl zeroes ``|x| <= np.quantile(|x|, 1 - keep)`` per row, which keeps the same entries up to one
    (its quantile interpolates between two order statistics).
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise ValidationError(f"keep must be a fraction in (0, 1], got {keep!r}")
    return min(d, max(1, math.ceil(keep * d - 1e-9)))


def _flat(flat: Tensor) -> Tensor:
    if not isinstance(flat, Tensor):
        raise ValidationError(f"flat must be a torch.Tensor, got {type(flat).__name__}")
    if flat.ndim != 2 or flat.shape[0] < 1 or flat.shape[1] < 1:
        raise ValidationError(
            f"flat must be a non-empty 2-D (n_experts, n_params) tensor, got {tuple(flat.shape)}"
        )
    if not flat.is_floating_point():
        raise ValidationError(f"flat must be floating point, got dtype {flat.dtype}")
    return flat.detach()


def _np(t: Tensor) -> np.ndarray:
    """A CPU float32/float64 numpy view of ``t`` (no copy for CPU float32/float64, else one block copy).

    numpy, because its BLAS call for ``a @ a.T`` is syrk (half the flops of torch's gemm) and its
    introselect ``partition`` is several times faster than ``torch.topk``/``kthvalue`` on long rows.
    """
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    return t.numpy()


def _work_dtype(flat: Tensor) -> type:
    return np.float64 if flat.dtype == torch.float64 else np.float32


def keep_thresholds(flat: Tensor, keep: float = 0.2) -> Tensor:
    """Per-row magnitude threshold t: MBC keeps ``|x| >= t``, zeroes the rest. Returns (n,) float64.

    t is the ⌈keep·d⌉-th largest |x| of the row (per row, as mttl does: ``np.quantile(..., axis=1)``),
    so experts of different overall scale keep the same share of entries. Ties at t are kept, so a row
    never loses all its nonzeros. Works through blocks of rows; raises on NaN/inf (they sort last, so
    checking the kept part of each row finds them at no extra pass).
    """
    flat = _flat(flat)
    n, d = flat.shape
    m = keep_count(d, keep)
    kth = d - m  # ascending position of the m-th largest
    rows = max(1, min(n, _BLOCK_BYTES // (d * np.dtype(_work_dtype(flat)).itemsize)))
    buf: np.ndarray = np.empty((rows, d), dtype=_work_dtype(flat))
    out = np.empty(n, dtype=np.float64)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        a = buf[: r1 - r0]
        np.abs(_np(flat[r0:r1]), out=a)
        if kth > 0:
            a.partition(kth, axis=1)
        if not np.isfinite(a[:, kth:].max(axis=1)).all():
            bad = r0 + int(np.flatnonzero(~np.isfinite(a[:, kth:].max(axis=1)))[0])
            raise ValidationError(f"flat row {bad} contains NaN or infinite values")
        out[r0:r1] = a[:, kth] if kth > 0 else 0.0
    return torch.from_numpy(out)


def sparsified_gram(flat: Tensor, thresholds: Tensor, *, block_cols: int | None = None) -> Tensor:
    """G = X̃ X̃ᵀ (n, n float64) of the sparsified rows X̃ = x·[|x| >= t], without ever forming X̃.

    Goes over d in column blocks (a bounded working buffer whatever d is), sparsifies each block and
    accumulates its syrk product in float64. This is the O(n²·d) part of MBC; memory is O(n² + n·block).
    """
    flat = _flat(flat)
    n, d = flat.shape
    thr = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
    if thr.shape[0] != n:
        raise ValidationError(f"thresholds must have shape ({n},), got {tuple(thresholds.shape)}")
    dtype = _work_dtype(flat)
    if block_cols is None:
        block_cols = max(1, _BLOCK_BYTES // (n * np.dtype(dtype).itemsize))
    block_cols = min(d, _int(block_cols, "block_cols", 1))
    t: np.ndarray = thr.numpy().astype(dtype)[:, None]
    buf: np.ndarray = np.empty((n, block_cols), dtype=dtype)
    mask = np.empty((n, block_cols), dtype=bool)
    gram = np.zeros((n, n), dtype=np.float64)
    for j0 in range(0, d, block_cols):
        j1 = min(d, j0 + block_cols)
        v = _np(flat[:, j0:j1])
        if j1 - j0 == block_cols:
            w, mk = buf, mask
        else:  # last, narrower block: fresh contiguous arrays so syrk still applies
            w, mk = np.empty((n, j1 - j0), dtype=dtype), np.empty((n, j1 - j0), dtype=bool)
        np.abs(v, out=w)
        np.greater_equal(w, t, out=mk)
        np.multiply(v, mk, out=w)
        gram += w @ w.T
    return torch.from_numpy(gram)


def _fix_signs(u: Tensor) -> Tensor:
    """Make each column's largest-magnitude entry positive (first one on ties): SVD signs are arbitrary."""
    idx = u.abs().argmax(dim=0)
    s = torch.sign(u[idx, torch.arange(u.shape[1])])
    return u * torch.where(s == 0, torch.ones_like(s), s)


def _normalize_rows(x: Tensor) -> Tensor:
    """Unit rows; an all-zero row stays zero (its direction is undefined) instead of becoming NaN."""
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def features_from_gram(gram: Tensor, dim: int = 64) -> Tensor:
    """MBC features from G = X̃X̃ᵀ: the top-``dim`` components U_k·Σ_k (= X̃·V_k, what scikit-learn's
    ``TruncatedSVD.fit_transform`` returns), sign-fixed and L2-normalised. Returns (n, min(dim, n)) float64.

    The eigenvectors of G are the left singular vectors of X̃ and its eigenvalues the squared singular
    values, so this is the exact truncated SVD at O(n³) cost, independent of d.
    """
    g = _square(gram, "gram")
    dim = _int(dim, "dim", 1)
    g = (g + g.T) / 2
    evals, evecs = torch.linalg.eigh(g)
    r = min(dim, g.shape[0])
    order = torch.arange(g.shape[0] - 1, g.shape[0] - 1 - r, -1)
    u = _fix_signs(evecs[:, order])
    return _normalize_rows(u * evals[order].clamp_min(0).sqrt())


def mbc_features(
    flat: Tensor,
    *,
    keep: float = 0.2,
    dim: int = 64,
    method: Literal["auto", "gram", "svd"] = "auto",
) -> Tensor:
    """MBC embedding of experts: (n, d) flattened LoRA parameters → (n, min(dim, n, d)) unit rows, float64.

    Per row, keep the ⌈keep·d⌉ largest-magnitude entries (mttl's ``sparsity_threshold`` is 1 − keep:
    0.8 by default, 0.5 in its MBC driver script), zero the rest, take the exact rank-``dim`` truncated SVD
    (no centring, like ``TruncatedSVD``), project (U·Σ) and L2-normalise. The column order of ``flat``
    does not matter as long as it is the same for every expert.

    ``method``: "gram" goes through the n × n Gram matrix in column blocks (memory O(n² + n·block) on top
    of ``flat``; n = 1000, d = 10⁶ takes seconds); "svd" runs ``torch.linalg.svd`` on the dense
    sparsified float64 matrix (small inputs); "auto" picks "gram" when d > n. Both give the same
    features; component signs are fixed (largest-magnitude entry of each left singular vector positive).
    ``flat`` may be float16/bfloat16/float32 (computed in float32, accumulated in float64) or float64.
    """
    flat = _flat(flat)
    dim = _int(dim, "dim", 1)
    n, d = flat.shape
    if method not in ("auto", "gram", "svd"):
        raise ValidationError(f"method must be 'auto', 'gram' or 'svd', got {method!r}")
    thr = keep_thresholds(flat, keep)
    if method == "gram" or (method == "auto" and d > n):
        return features_from_gram(sparsified_gram(flat, thr), min(dim, d))
    x = flat.to(device="cpu", dtype=torch.float64)
    x = torch.where(x.abs() >= thr[:, None], x, torch.zeros_like(x))
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    r = min(dim, n, d)
    return _normalize_rows(_fix_signs(u[:, :r]) * s[:r])


def cosine_matrix(features: Tensor) -> Tensor:
    """Cosine similarity of the rows, (n, n) float64: exactly symmetric, in [−1, 1], diagonal 1.

    Rows are normalised here too, so un-normalised features are fine; an all-zero row has similarity 0
    to every other row (and 1 to itself by definition).
    """
    f = _normalize_rows(_matrix(features, "features"))
    s = f @ f.T
    s = ((s + s.T) / 2).clamp_(-1.0, 1.0)
    s.fill_diagonal_(1.0)
    return s


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
    xs = _matrix(x, "x")
    n = xs.shape[0]
    k = _k(k, n)
    n_init = _int(n_init, "n_init", 1)
    max_iter = _int(max_iter, "max_iter", 1)
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValidationError(f"tol must be a number >= 0, got {tol!r}")
    gen = torch.Generator().manual_seed(_int(seed, "seed", -(2**63)))
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
    return kmeans(_square(S, "S"), k, seed=seed, n_init=n_init, max_iter=max_iter)


def mbc(
    flat: Tensor,
    k: int = 10,
    *,
    keep: float = 0.2,
    dim: int = 64,
    seed: int = 0,
    n_init: int = 10,
) -> MBCResult:
    """The whole MBC pipeline: ``mbc_features`` → ``cosine_matrix`` → ``cluster_similarity``.
    Defaults are mttl's (keep 20%, 64 dimensions, k = 10, 10 restarts); mttl seeds with 42."""
    n = _flat(flat).shape[0]
    k = _k(k, n)
    features = mbc_features(flat, keep=keep, dim=dim)
    similarity = cosine_matrix(features)
    return MBCResult(features, similarity, cluster_similarity(similarity, k, seed=seed, n_init=n_init))


# ---
# quality of a clustering, choice of k, a picture


def _distance(S_or_D: Tensor, metric: Metric) -> Tensor:
    m = _square(S_or_D, "S_or_D")
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
    sim = _square(S, "S")
    n = sim.shape[0]
    ks = sorted({_k(k, n) for k in k_range})
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
    sim = _square(S, "S")
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
    sim = _square(S, "S")
    sim = (sim + sim.T) / 2
    n = sim.shape[0]
    centred = sim - sim.mean(0, keepdim=True) - sim.mean(1, keepdim=True) + sim.mean()
    evals, evecs = torch.linalg.eigh(centred)
    r = min(2, n)
    order = torch.arange(n - 1, n - 1 - r, -1)
    coords = _fix_signs(evecs[:, order] * evals[order].clamp_min(0).sqrt())
    if r < 2:
        coords = torch.cat([coords, torch.zeros(n, 2 - r, dtype=coords.dtype)], dim=1)
    return coords
