"""The router interface: what a router needs per expert and module, and how it scores a token.

A *router* decides, per token (or per sequence) and routed module, which experts take part and with
which weights. The routed layer (:class:`~libstore.router.layer.RoutedLinear`) owns the mechanics
that every router shares — top-k, softmax over the top-k scores divided by the temperature, the
low-rank strategies, tracing, per-sequence routing — and asks its router only two things:

- **keys**: a few rows of ``in_features`` per expert and module, computed once at build time (from
  the factors, or read from the prototype cache: :meth:`Router.cache` names the cache entry), and
  stacked for all experts of the module as one ``(M, in)`` buffer;
- **score**: ``(t, in)`` token states and the keys -> ``(t, E)`` scores, larger is better.

A new router is one module in this package implementing :class:`Router`, plus one line in
:data:`libstore.router.routers.ROUTERS`. Routers are frozen: no state changes after construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from libstore.types import PrototypeMethod


@dataclass(frozen=True)
class CacheKey:
    """A prototype-cache entry a router reads: method and parameters (see ``ops.prototypes``)."""

    method: PrototypeMethod
    top_n: int = 1
    seed: int = 0


class Router(Protocol):
    """How a routed layer scores tokens against its experts.

    Attributes:
        name: the registry name (``arrow``, ``spectr``, ``uniform``).
        all_experts: route every token to every expert with equal weights (no scores; top_k ignored).
    """

    @property
    def name(self) -> str: ...

    @property
    def all_experts(self) -> bool: ...

    def params(self) -> dict[str, Any]:
        """The router's parameters, JSON-ready (recorded with evaluations)."""
        ...

    def cache(self) -> CacheKey | None:
        """The prototype-cache entry whose rows this router's keys come from; ``None``: no keys."""
        ...

    def key_rows(self, rank: int, in_features: int, out_features: int) -> int:
        """How many key rows one expert-module of this shape has."""
        ...

    def keys(self, A: Tensor, B: Tensor, scale: Tensor) -> Tensor:
        """Keys of a batch of equal-shaped modules from their factors: A (N, r, in), B (N, out, r),
        scale (N,) -> (N, key_rows, in). Used when nothing is cached (e.g. GenKnowSub on the fly)."""
        ...

    def cached_keys(self, vectors: Tensor, values: Tensor, scale: float) -> Tensor:
        """Keys of one expert-module from its cached entry: vectors (n, in), values (n,) -> (rows, in).
        The cache holds the values of B·A, the same for every expert with these weights; ``scale`` is
        this expert's LoRA scale s (ΔW = s·B·A)."""
        ...

    def score(self, h: Tensor, keys: Tensor, rows: int | None, owner: Tensor, experts: int) -> Tensor:
        """Scores (t, E) of tokens h (t, in) fp32 against the E = ``experts`` experts' keys (M, in) fp32.

        ``rows`` is the number of key rows of every expert when they are all equal, else ``None``;
        ``owner`` (M,) long gives each key row's expert (0..E-1) for the unequal case.
        """
        ...


def projection_norm(h: Tensor, keys: Tensor, rows: int | None, owner: Tensor, experts: int) -> Tensor:
    """``||K_e h||_2`` per expert e, where K_e are the key rows of expert e: (t, E).

    One GEMM for all experts, then a sum of squares per expert (a view when every expert has the same
    number of rows, an ``index_add`` otherwise).
    """
    z = h @ keys.T  # (t, M)
    if rows is not None:
        norms: Tensor = torch.linalg.vector_norm(z.view(h.shape[0], experts, rows), dim=-1)
        return norms
    sq = torch.zeros(h.shape[0], experts, dtype=z.dtype, device=z.device).index_add_(1, owner, z * z)
    return sq.sqrt()
