"""Uniform: every expert of a module, equal weights 1/E, for every token — the reference row of the
plain average of the experts' outputs (``top_k`` and ``temperature`` do not apply)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from libstore.router.routers.base import CacheKey


@dataclass(frozen=True)
class Uniform:
    """Uniform average of the experts (no keys, no scores)."""

    name: str = field(default="uniform", init=False)
    all_experts: bool = field(default=True, init=False)

    def params(self) -> dict[str, Any]:
        return {}

    def cache(self) -> CacheKey | None:
        return None

    def key_rows(self, rank: int, in_features: int, out_features: int) -> int:
        return 0

    def keys(self, A: Tensor, B: Tensor, scale: Tensor) -> Tensor:
        return A.new_zeros(A.shape[0], 0, A.shape[-1])

    def cached_keys(self, vectors: Tensor, values: Tensor, scale: float) -> Tensor:
        return vectors[:0]

    def score(self, h: Tensor, keys: Tensor, rows: int | None, owner: Tensor, experts: int) -> Tensor:
        return torch.zeros(h.shape[0], experts, dtype=h.dtype, device=h.device)
