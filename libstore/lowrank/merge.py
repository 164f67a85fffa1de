"""Weighted merges of LoRA updates in ΔW space, exact or truncated, never forming ΔW.

Averaging A and B separately (what parameter-space merges do) is not the average of the updates:
B̄·Ā ≠ mean(B_i·A_i). The merge here is exact in function space — Σ_i w_i·s_i·B_i·A_i is held at
rank Σ r_i by concatenating the factors — and optionally truncated to a chosen rank by the SVD of the
factors (Eckart–Young optimal), reporting the energy kept. GenKnowSub's delta mode is this merge with
weights [1, −1/G, …, −1/G] (see :mod:`libstore.lowrank.gks`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from libstore.errors import ValidationError
from libstore.lowrank.factors import LowRankDelta, Scale, concat_factors, truncate

__all__ = ["LowRankDelta", "merge_delta"]


def merge_delta(
    experts_modules: Sequence[tuple[Tensor, Tensor, Scale]],
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
) -> LowRankDelta:
    """ΔW = Σ_i w_i·s_i·B_i·A_i for one module (optionally batched over leading dims) as factors.

    Args:
        experts_modules: per expert, the (A, B, scale) of the same Linear layer; ranks may differ.
        weights: one per expert; default uniform 1/n (the plain average of the updates).
        rank: ``None`` keeps the exact concatenation (rank Σ r_i, ``energy_kept`` 1.0); an int
            truncates to that rank by SVD (balanced factors, zero-padded if ΔW has lower rank), and
            ``energy_kept`` = ‖kept‖²_F/‖ΔW‖²_F, summed over batch dims.

    The result has scale 1.0: weights and scales are folded into the factors (see LowRankDelta).
    """
    n = len(experts_modules)
    if n == 0:
        raise ValidationError("merge_delta needs at least one module")
    w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    A, B = concat_factors(experts_modules, w)
    if rank is None:
        return LowRankDelta(A, B, 1.0, 1.0)
    return truncate(A, B, rank)
