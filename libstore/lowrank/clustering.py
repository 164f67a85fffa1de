"""MBC (model-based clustering) of experts: from LoRA parameters to a similarity matrix, as pure
functions on tensors.

The paper's method (Ostapenko et al., arXiv 2405.11157; microsoft/mttl,
``mttl/models/library/library_transforms.py``: ``SVDEmbeddingTransform`` + ``MBCWithCosSimTransform``):
flatten each expert's LoRA parameters into one row, keep the largest fraction of each row by magnitude,
reduce with a truncated SVD to 64 dimensions, L2-normalise, take the cosine-similarity matrix and run
k-means (k-means++, 10 restarts) on its *rows* (:mod:`libstore.lowrank.partition`). mttl uses
scikit-learn's randomized ``TruncatedSVD``; libstore computes the SVD exactly, through the n × n Gram
matrix when d ≫ n, so n = 1000 experts of a few million parameters fit in memory.

:func:`mbc_similarity` is the production path (``libstore cluster``): the same math with the experts'
parameters arriving in pieces (each expert's row once, then column blocks), so the caller can stream
them from storage with bounded memory. :func:`mbc_features` + :func:`cosine_matrix` is the in-memory
path it is tested against.

Conventions: similarities and features are float64 (they are small: n × n, n × dim).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from libstore.errors import ValidationError
from libstore.lowrank.factors import check_int, fix_column_signs, float64_matrix, square_matrix
from libstore.lowrank.partition import KMeansResult, check_k, cluster_similarity

__all__ = [
    "MBCResult",
    "cosine_matrix",
    "features_from_gram",
    "keep_count",
    "keep_thresholds",
    "mbc",
    "mbc_features",
    "mbc_similarity",
    "sparsified_gram",
]

# Working-buffer budget for the chunked passes over d (bytes). Big enough for BLAS to run at full speed
# (syrk with ≥ 16k columns), small enough to stay far below the size of the input itself.
_BLOCK_BYTES = 128 * 2**20


@dataclass(frozen=True)
class MBCResult:
    """One MBC run end to end: features (n, p), cosine similarity (n, n) and the k-means clustering."""

    features: Tensor
    similarity: Tensor
    clustering: KMeansResult


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
    block_cols = min(d, check_int(block_cols, "block_cols", 1))
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
    g = square_matrix(gram, "gram")
    dim = check_int(dim, "dim", 1)
    g = (g + g.T) / 2
    evals, evecs = torch.linalg.eigh(g)
    r = min(dim, g.shape[0])
    order = torch.arange(g.shape[0] - 1, g.shape[0] - 1 - r, -1)
    u = fix_column_signs(evecs[:, order])
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
    dim = check_int(dim, "dim", 1)
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
    return _normalize_rows(fix_column_signs(u[:, :r]) * s[:r])


def cosine_matrix(features: Tensor) -> Tensor:
    """Cosine similarity of the rows, (n, n) float64: exactly symmetric, in [−1, 1], diagonal 1.

    Rows are normalised here too, so un-normalised features are fine; an all-zero row has similarity 0
    to every other row (and 1 to itself by definition).
    """
    f = _normalize_rows(float64_matrix(features, "features"))
    s = f @ f.T
    s = ((s + s.T) / 2).clamp_(-1.0, 1.0)
    s.fill_diagonal_(1.0)
    return s


def mbc_similarity(
    rows: Iterable[Tensor],
    blocks: Iterable[Tensor],
    *,
    n: int,
    first_width: int,
    keep: float = 0.2,
    dim: int = 64,
    block_cols: int | None = None,
) -> tuple[Tensor, int]:
    """MBC's cosine similarity (n, n) float64 of experts whose flattened parameters arrive in pieces;
    and the feature dimension used. Equals ``cosine_matrix(mbc_features(flat, keep=keep, dim=dim))``.

    Args:
        rows: each of the ``n`` experts' whole flattened row (d,), in expert order, read once: the
            magnitude threshold needs the whole row. Its first ``first_width`` columns are kept.
        blocks: the remaining columns, as (n, w) blocks in column order (every expert's slice of the
            next columns). Empty when the first block is the whole row.
        block_cols: working-buffer width of :func:`sparsified_gram`.

    Memory: n × ``first_width`` plus one block at a time, plus O(n²): a caller that reads the rows and
    blocks from storage lazily (generators) holds only that, however large the experts are.
    """
    n = check_int(n, "n", 1)
    first_width = check_int(first_width, "first_width", 1)
    first: Tensor | None = None
    thr = torch.empty(n, dtype=torch.float64)
    d = seen = 0
    for i, row in enumerate(rows):
        if i >= n:
            raise ValidationError(f"more than n={n} rows given")
        row = _flat(row.reshape(1, -1))
        d = row.shape[1]
        if first is None:
            first = row.new_empty(n, min(first_width, d))
        thr[i] = keep_thresholds(row, keep)[0]
        first[i] = row[0, : first.shape[1]]
        seen = i + 1
        del row
    if first is None or seen != n:
        raise ValidationError(f"{seen} rows given for n={n} experts" if seen else "no experts to compare")
    gram = sparsified_gram(first, thr, block_cols=block_cols)
    del first
    for block in blocks:
        gram += sparsified_gram(block, thr, block_cols=block_cols)
        del block  # before the next block is read: one block at a time
    features = features_from_gram(gram, min(check_int(dim, "dim", 1), d))
    return cosine_matrix(features), int(features.shape[1])


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
    k = check_k(k, n)
    features = mbc_features(flat, keep=keep, dim=dim)
    similarity = cosine_matrix(features)
    return MBCResult(features, similarity, cluster_similarity(similarity, k, seed=seed, n_init=n_init))
