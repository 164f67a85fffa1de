"""A per-sequence routed mixture as one plain LoRA: exact factors a serving engine can load.

With per-sequence routing every module of a sequence uses one fixed mixture of its experts, so the
sequence's model is the base plus one low-rank update per module::

    mixing="output":     ΔW = Σ_j c_j s_j B_j A_j = [c_1 s_1 B_1 | … | c_k s_k B_k] · [A_1; …; A_k]
                         rank Σ_j r_j (A's stacked, B's weighted), exact
    mixing="parameter":  ΔW = (Σ_j c_j s_j B_j)(Σ_j c_j A_j)      rank r, exact

:func:`mixture_factors` returns those factors with the scale folded in (a PEFT adapter with
``lora_alpha = r``, so that PEFT's scale alpha/r is 1), zero-padded to one rank for all modules
(zero rows and columns change no product).
"""

from __future__ import annotations

import torch
from torch import Tensor

from libstore.errors import RouterError
from libstore.router.model import RoutedModel
from libstore.router.sequence import SequenceRoutes

__all__ = ["mixture_factors"]


def mixture_factors(
    routed: RoutedModel, routes: SequenceRoutes, sequence: int = 0
) -> dict[str, tuple[Tensor, Tensor]]:
    """module -> (A (K, in), B (out, K)) fp32 on the CPU with B·A the module's routed ΔW for sequence
    ``sequence`` of ``routes``; K is the same for every module. Modules whose chosen experts all lack
    them (weight 0) are left out: they add nothing.

    Raises:
        RouterError: routes of another router, a module with no routes (the prompt did not run
            through it inside the block), or a sequence index outside the batch.
    """
    if routes.experts != routed.experts:
        raise RouterError("these routes were made by a router over other experts")
    parts: dict[str, tuple[Tensor, Tensor]] = {}
    for name, layer in routed.layers.items():
        if name not in routes.routes:
            raise RouterError(
                f"no routes for {name!r}: run the prompt through the model inside the routing block first"
            )
        ids, weights = routes.routes[name]
        if not 0 <= sequence < ids.shape[0]:
            raise RouterError(f"sequence {sequence} is outside the batch of {ids.shape[0]}")
        local, w = layer.to_local(ids[sequence : sequence + 1], weights[sequence : sequence + 1])
        offsets = [0]
        for r in layer.ranks:
            offsets.append(offsets[-1] + r)
        A_all = layer.lora_A.detach().to("cpu", torch.float32)
        Bt_all = layer.lora_Bt.detach().to("cpu", torch.float32)  # scale folded in
        chosen = [(int(e), float(c)) for e, c in zip(local[0].tolist(), w[0].tolist(), strict=True) if c > 0]
        if not chosen:
            continue
        As = [A_all[offsets[e] : offsets[e + 1]] for e, _ in chosen]
        Bs = [c * Bt_all[offsets[e] : offsets[e + 1]].T for e, c in chosen]
        if layer.mixing == "parameter":
            parts[name] = (
                torch.stack([c * a for (_, c), a in zip(chosen, As, strict=True)]).sum(0),
                torch.stack(Bs).sum(0),
            )
        else:
            parts[name] = (torch.cat(As), torch.cat(Bs, dim=1))
    if not parts:
        raise RouterError("the chosen experts have none of the routed modules: nothing to export")
    K = max(a.shape[0] for a, _ in parts.values())
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for name, (a, b) in parts.items():
        pad = K - a.shape[0]
        if pad:
            a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
            b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        out[name] = (a.contiguous(), b.contiguous())
    return out
