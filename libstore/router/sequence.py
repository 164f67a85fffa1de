"""Per-sequence routing: each sequence of a batch uses one set of experts in every routed module.

A :class:`SequenceRoutes` is shared by the routed layers inside a
:meth:`~libstore.router.model.RoutedModel.sequence_routing` or
:meth:`~libstore.router.model.RoutedModel.pinned` block. At its first call inside the block a
module either *decides* — the router's scores averaged over each sequence's tokens of that call
(the prompt; padding excluded by ``mask``), then top-k and the softmax with temperature, as for one
token — or takes the *given* experts, and keeps them for every later call (the decoding steps).
Modules upstream are already routed this way when a module decides, exactly as in a generation.

The per-module choice is a fixed mixture of LoRA updates, so a sequence-routed model is one plain
LoRA per sequence (:mod:`libstore.router.export` writes it as a PEFT adapter).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from libstore.errors import RouterError

__all__ = ["SequenceRoutes"]


class SequenceRoutes:
    """The experts and weights of each sequence, per routed module.

    Attributes:
        experts: the router's expert names (``routes`` index into it).
        mask: (batch, seq) 1 for the tokens that decide (the first call's), or ``None`` for all.
        every: given routes ``(ids (batch, k), weights (batch, k))`` for every module, or ``None``.
        routes: module -> ``(ids (batch, k) long, weights (batch, k) float32)``, filled as modules run.
    """

    def __init__(
        self,
        experts: Sequence[str],
        *,
        mask: Tensor | None = None,
        every: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        self.experts: tuple[str, ...] = tuple(experts)
        self.mask = mask
        self.every = every
        self.routes: dict[str, tuple[Tensor, Tensor]] = {}
        self.local: dict[str, tuple[Tensor, Tensor]] = {}  # the layers' own cache: local indices

    @classmethod
    def given(
        cls,
        names: Sequence[str],
        choice: Sequence[Sequence[str]],
        weights: Sequence[Sequence[float]] | None = None,
    ) -> SequenceRoutes:
        """Routes that send sequence i to the experts ``choice[i]`` (names) in every module.

        ``weights[i]`` default to equal weights summing to 1. A module an expert does not have
        gets no update from it (its weight counts as 0 there; the others are not renormalised).
        """
        if not choice:
            raise RouterError("given routes need at least one sequence")
        width = max(len(c) for c in choice)
        if min(len(c) for c in choice) == 0:
            raise RouterError("every sequence needs at least one expert")
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted({n for c in choice for n in c if n not in index})
        if unknown:
            raise RouterError(f"experts {unknown[:5]} are not routed by this model")
        ids = torch.zeros(len(choice), width, dtype=torch.long)
        w = torch.zeros(len(choice), width, dtype=torch.float32)
        for i, c in enumerate(choice):
            wi = list(weights[i]) if weights is not None else [1.0 / len(c)] * len(c)
            if len(wi) != len(c):
                raise RouterError(f"sequence {i}: {len(c)} experts but {len(wi)} weights")
            ids[i, : len(c)] = torch.tensor([index[n] for n in c])
            w[i, : len(c)] = torch.tensor(wi, dtype=torch.float32)
        return cls(names, every=(ids, w))

    def names(self, module: str, sequence: int = 0) -> list[tuple[str, float]]:
        """(expert, weight) pairs sequence ``sequence`` uses in ``module``, best first."""
        if module not in self.routes:
            raise RouterError(
                f"no routes for {module!r} yet: run the model on the prompt inside the block first"
            )
        ids, w = self.routes[module]
        return [
            (self.experts[int(i)], round(float(x), 6))
            for i, x in zip(ids[sequence].tolist(), w[sequence].tolist(), strict=True)
            if x > 0
        ]
