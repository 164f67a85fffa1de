"""SpectR (Fleshman & Van Durme, "SpectR: Dynamically Composing LM Experts with Spectral Routing",
arXiv 2504.03454, COLM 2025): route with the whole spectrum of each expert's ΔW.

Score of expert e for token h, per module::

    score_e(h) = ||Σ_e V_eᵀ h||_2 = sqrt(hᵀ V_e Σ_e² V_eᵀ h) = ||ΔW_e h||_2
    where ΔW_e = s_e·B_e·A_e = U_e Σ_e V_eᵀ

i.e. the norm of h under the adapter's covariance ΔWᵀΔW = V Σ² Vᵀ (all of its singular directions,
each weighted by its singular value), where Arrow keeps only the top direction, unweighted. The top-k
scores then go through the same softmax with temperature as Arrow's. The keys are the rows σ_j·v_jᵀ,
j = 1..min(r, in, out): the cached full spectrum (prototype-cache method ``spectrum``, σ of B·A, times
the expert's |s|), computed by the exact factor SVD, never forming ΔW. Scoring costs one
(t x in) @ (in x Σ_e r_e) GEMM per module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from libstore.lowrank.prototypes import exact_prototypes
from libstore.router.routers.base import CacheKey, projection_norm


@dataclass(frozen=True)
class SpectR:
    """SpectR routing (no parameters)."""

    name: str = field(default="spectr", init=False)
    all_experts: bool = field(default=False, init=False)

    def params(self) -> dict[str, Any]:
        return {}

    def cache(self) -> CacheKey:
        return CacheKey("spectrum")

    def key_rows(self, rank: int, in_features: int, out_features: int) -> int:
        return min(rank, in_features, out_features)

    def keys(self, A: Tensor, B: Tensor, scale: Tensor) -> Tensor:
        n = min(A.shape[-2], A.shape[-1], B.shape[-2])
        p = exact_prototypes(A, B, scale, top_n=n)
        return p.vectors * p.values.unsqueeze(-1)

    def cached_keys(self, vectors: Tensor, values: Tensor, scale: float) -> Tensor:
        return vectors * (values * abs(scale)).unsqueeze(-1)  # cached σ are of B·A; ΔW = s·B·A

    def score(self, h: Tensor, keys: Tensor, rows: int | None, owner: Tensor, experts: int) -> Tensor:
        return projection_norm(h, keys, rows, owner, experts)
