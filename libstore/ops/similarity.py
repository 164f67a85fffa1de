"""Similarity matrices of stored experts, and their heatmap.

Two metrics (math in ``libstore.lowrank.similarity``):

- ``delta`` (default): the cosine of the experts' updates ΔW over all modules, exact and gauge
  invariant, by the trace formula ⟨ΔW₁, ΔW₂⟩ = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)); ΔW is never formed.
- ``flat``: the cosine of the flattened LoRA parameters, as the MBC paper computes it.

Experts must share base model and LoRA modules; ranks may differ for ``delta`` (``flat`` compares raw
parameters and needs equal ranks). Tensors are streamed from the
store one group of modules at a time, the path ``libstore cluster`` uses (``ops.clusters``), so a
library far larger than memory can be compared.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from libstore.errors import ValidationError
from libstore.ops.context import Context
from libstore.ops.select import Target, resolve_experts
from libstore.ops.tensors import check_compatible, default_device
from libstore.types import SIMILARITY_METRICS, SimilarityMetric

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SimilarityMatrix:
    """A symmetric cosine-similarity matrix of experts.

    Attributes:
        names: the experts, in row/column order (sorted by name for a query).
        values: ``values[i][j]`` = cosine of experts i and j, in [-1, 1], 1 on the diagonal.
        metric: ``delta`` (cosine of ΔW) or ``flat`` (cosine of flattened parameters).
    """

    names: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    metric: SimilarityMetric

    def __getitem__(self, pair: tuple[str, str]) -> float:
        """``m["a", "b"]``: the similarity of two experts by name."""
        a, b = pair
        return self.values[self.names.index(a)][self.names.index(b)]

    def as_tensor(self) -> torch.Tensor:
        import torch

        return torch.tensor(self.values, dtype=torch.float64)


@dataclass(frozen=True)
class SimilarityOptions:
    """The options of ``libstore similarity`` and ``Library.similarity``: the metric, and where the
    math runs (default cuda if available)."""

    metric: SimilarityMetric = "delta"
    device: str | None = None


def similarity(
    ctx: Context,
    target: Target = None,
    *,
    options: SimilarityOptions,
    budget_bytes: int | None = None,
) -> SimilarityMatrix:
    """The similarity matrix of the experts ``target`` names (a query, names, or Experts).

    ``budget_bytes`` bounds the expert tensors held at once (default ``ops.clusters.STREAM_BYTES``).
    """
    import torch

    from libstore.lowrank.similarity import flat_similarity, module_groups
    from libstore.ops import clusters

    metric, device = options.metric, options.device
    if metric not in SIMILARITY_METRICS:
        raise ValidationError(
            f"unknown metric {metric!r}; metrics are {', '.join(SIMILARITY_METRICS)}", field="metric"
        )
    experts = resolve_experts(ctx, target)
    check_compatible(experts, operation="similarity")
    clusters.check_experts(experts, metric)
    dev = default_device(device)
    budget = clusters.STREAM_BYTES if budget_bytes is None else budget_bytes
    with torch.no_grad():
        if metric == "delta":
            cos = clusters.delta_similarity(ctx, experts, device=dev, budget=budget)
        else:
            widths = {m: s.rank * (s.in_features + s.out_features) for m, s in experts[0].modules.items()}
            groups = module_groups(widths, len(experts), budget)
            cos = flat_similarity(clusters.flat_blocks(ctx, experts, groups, device=dev))
    values = cos.to("cpu", torch.float64).tolist()
    return SimilarityMatrix(
        names=tuple(e.name for e in experts),
        values=tuple(tuple(float(v) for v in row) for row in values),
        metric=metric,
    )


def plot(matrix: SimilarityMatrix, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write a heatmap PNG of ``matrix``.

    Uses a bare ``matplotlib.figure.Figure`` (Agg canvas), never pyplot, so it needs no display and
    leaves the caller's matplotlib backend and figures alone.
    """
    from matplotlib.figure import Figure

    n = len(matrix.names)
    size = min(2 + 0.35 * n, 40)
    fig = Figure(figsize=(size + 1.5, size))
    ax = fig.subplots()
    im = ax.imshow(matrix.values, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    ax.set_xticks(range(n), matrix.names, rotation=90, fontsize=8)
    ax.set_yticks(range(n), matrix.names, fontsize=8)
    ax.set_title(title or f"expert similarity ({matrix.metric} cosine)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    return out
