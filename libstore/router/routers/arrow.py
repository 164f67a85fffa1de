"""Arrow (Ostapenko et al. 2024; PEFT's ``create_arrow_model``): score = |<h, v_1>|, v_1 the top right
singular vector of the expert's ΔW = s·B·A.

With ``top_n`` > 1 the score is the norm of h's projection onto the top-n right singular subspace,
``||V_nᵀ h||_2`` (unweighted by the singular values; ``top_n = 1`` is exactly Arrow's |<h, v_1>|). The
keys are the cached exact prototypes (``method="exact"``, ``top_n``), or PEFT's power-iteration vector
(``method="peft"``, bit for bit, ``top_n = 1`` only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from libstore.errors import RouterError
from libstore.lowrank.prototypes import exact_prototypes, peft_prototypes
from libstore.router.routers.base import CacheKey, projection_norm
from libstore.types import PrototypeMethod

PrototypeFn = Callable[[Tensor, Tensor], Tensor]
"""Prototype vectors of a batch of modules: A (N, r, in), B (N, out, r) -> (N, in), one unit row each."""


def exact_prototype_fn(A: Tensor, B: Tensor) -> Tensor:
    """Exact top right singular vector of B·A (thin QR + small SVD, sign fixed); fp32 (fp64 stays)."""
    return exact_prototypes(A, B).vectors[..., 0, :]


def peft_prototype_fn(*, seed: int = 0, iters: int = 15) -> PrototypeFn:
    """PEFT's power iteration with ``ArrowConfig(rng_seed=seed)``, bit for bit on CPU fp32."""

    def fn(A: Tensor, B: Tensor) -> Tensor:
        return peft_prototypes(A, B, iters=iters, seed=seed).vectors[..., 0, :]

    fn.__name__ = f"peft_prototypes_seed{seed}"
    return fn


METHODS: tuple[PrototypeMethod, ...] = ("exact", "peft")


@dataclass(frozen=True)
class Arrow:
    """Arrow routing.

    Attributes:
        top_n: prototypes per expert and module (1: Arrow as published and as PEFT has it).
        method: ``exact`` (default) or ``peft`` (PEFT's 15-step power iteration with ``seed``).
        seed: PEFT's ``rng_seed`` for ``method="peft"``.
        prototype_fn: overrides how ``top_n = 1`` prototypes are computed from factors (tests, PEFT).
    """

    top_n: int = 1
    method: PrototypeMethod = "exact"
    seed: int = 0
    prototype_fn: PrototypeFn | None = field(default=None, compare=False)
    name: str = field(default="arrow", init=False)
    all_experts: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.top_n, int) or self.top_n < 1:
            raise RouterError(f"arrow: top_n must be a positive integer, got {self.top_n!r}")
        if self.method not in METHODS:
            raise RouterError(f"arrow: unknown prototype method {self.method!r}; use one of {METHODS}")
        if self.method == "peft" and self.top_n != 1:
            raise RouterError(
                "arrow: method 'peft' gives one prototype per module; use 'exact' for top_n > 1"
            )

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"top_n": self.top_n, "method": self.method}
        if self.method == "peft":
            out["seed"] = self.seed
        return out

    def cache(self) -> CacheKey:
        return CacheKey(self.method, top_n=self.top_n, seed=self.seed)

    def key_rows(self, rank: int, in_features: int, out_features: int) -> int:
        if self.top_n > min(rank, in_features, out_features):
            raise RouterError(
                f"arrow: top_n={self.top_n} but a module of rank {rank} ({out_features} x {in_features}) "
                f"has at most {min(rank, in_features, out_features)} singular vectors"
            )
        return self.top_n

    def keys(self, A: Tensor, B: Tensor, scale: Tensor) -> Tensor:
        if self.top_n == 1:
            fn = self.prototype_fn or (
                peft_prototype_fn(seed=self.seed) if self.method == "peft" else exact_prototype_fn
            )
            return fn(A, B).unsqueeze(1)
        return exact_prototypes(A, B, top_n=self.top_n).vectors

    def cached_keys(self, vectors: Tensor, values: Tensor, scale: float) -> Tensor:
        return vectors[: self.top_n]

    def score(self, h: Tensor, keys: Tensor, rows: int | None, owner: Tensor, experts: int) -> Tensor:
        if rows == 1:
            return torch.abs(h @ keys.T)  # as PEFT: |<h, p_e>| in fp32
        return projection_norm(h, keys, rows, owner, experts)
