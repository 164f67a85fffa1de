"""GenKnowSub: subtract the general-knowledge adapters' average from a task adapter.

Two modes:

- **parameter** (:func:`subtract_general_param`): A' = A − mean_g A_g, B' = B − mean_g B_g, what the
  paper's code and PEFT's ``create_arrow_model(..., use_gks=True)`` do. Needs equal ranks. Note that
  B'·A' ≠ B·A − mean(B_g·A_g): it also adds cross terms.
- **delta** (:func:`subtract_general_delta`): ΔW' = ΔW − mean_g ΔW_g exactly, at rank r + Σ r_g, or
  truncated by SVD to a chosen rank with the kept energy reported. Any ranks and scales.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from libstore.errors import IncompatibleExpertsError, ValidationError
from libstore.lowrank.factors import LowRankDelta, Scale, check_module, work_dtype
from libstore.lowrank.merge import merge_delta

__all__ = ["Residual", "subtract_general_delta", "subtract_general_param"]

Residual = LowRankDelta
"""A GenKnowSub residual: A, B, scale (always 1.0: scales are folded into the factors) and energy_kept."""


def subtract_general_param(
    A: Tensor, B: Tensor, general_As: Sequence[Tensor], general_Bs: Sequence[Tensor]
) -> tuple[Tensor, Tensor]:
    """Parameter-mode GenKnowSub, bit-identical to PEFT's ``ArrowLoraLinearLayer.gen_know_sub``.

    PEFT 0.21 computes ``torch.stack([general weights]).mean(0)`` for A and for B in the weight dtype
    (float32: PEFT upcasts fp16/bf16 adapters on load) and subtracts it in place from each task
    adapter, once, at the first forward. This does the same ops on fp32 copies (inputs are not
    modified; float64 stays float64). Leading batch dims are allowed and must match.

    Raises:
        IncompatibleExpertsError: a general adapter's rank or shape differs from the task adapter's.
    """
    if len(general_As) == 0 or len(general_As) != len(general_Bs):
        raise ValidationError(
            f"need one or more general adapters with A and B each, got {len(general_As)} A and "
            f"{len(general_Bs)} B"
        )
    r, n_in, n_out, batch = check_module(A, B, "task adapter")
    for g, (Ag, Bg) in enumerate(zip(general_As, general_Bs, strict=True)):
        rg, g_in, g_out, g_batch = check_module(Ag, Bg, f"general adapter {g}")
        if rg != r:
            raise IncompatibleExpertsError(
                f"general adapter {g} has rank {rg} but the task adapter rank {r}: parameter-mode GenKnowSub "
                "averages A and B entrywise and needs equal ranks; use delta mode (subtract_general_delta), "
                "which is exact in function space for any ranks"
            )
        if (g_in, g_out, g_batch) != (n_in, n_out, batch):
            raise IncompatibleExpertsError(
                f"general adapter {g} has in={g_in}, out={g_out}, batch {tuple(g_batch)}; the task "
                f"adapter has "
                f"in={n_in}, out={n_out}, batch {tuple(batch)}: they do not adapt the same layer"
            )
    dtype = work_dtype(A, B, *general_As, *general_Bs)
    avg_A = torch.stack([a.to(dtype) for a in general_As], dim=0).mean(0)
    avg_B = torch.stack([b.to(dtype) for b in general_Bs], dim=0).mean(0)
    return A.to(dtype) - avg_A, B.to(dtype) - avg_B


def subtract_general_delta(
    A: Tensor,
    B: Tensor,
    scale: Scale,
    general: Sequence[tuple[Tensor, Tensor, Scale]],
    *,
    rank: int | None = None,
) -> Residual:
    """Delta-mode GenKnowSub: ΔW' = s·B·A − (1/G)·Σ_g s_g·B_g·A_g, exact in function space.

    It is :func:`libstore.lowrank.merge.merge_delta` with weights [1, −1/G, …]: exact at rank
    r + Σ r_g (scales folded into B, scale 1.0, energy_kept 1.0), or truncated by SVD to ``rank``.
    """
    if len(general) == 0:
        raise ValidationError("GenKnowSub needs at least one general adapter")
    G = len(general)
    return merge_delta([(A, B, scale), *general], weights=[1.0] + [-1.0 / G] * G, rank=rank)
