"""The routed Linear: a base ``nn.Linear`` plus routing (Arrow by default) over a bank of LoRA experts.

One :class:`RoutedLinear` replaces one targeted ``nn.Linear`` of the base model (the base layer is
kept inside it, untouched). For an input ``x`` (any leading shape) it computes, per token ``h``::

    scores_e = router.score(h)                    over the E experts that have this module (fp32);
                                                  Arrow: |<h, prototype_e>|, SpectR: ||Σ_e V_eᵀ h||
                                                  (libstore.router.routers)
    S        = topk(scores, min(top_k, E))        (torch.topk: same order, same ties as PEFT)
    c        = softmax(scores_S / temperature)
    output   = base(x) + sum_{e in S} c_e * s_e * B_e (A_e h)          mixing="output"   (PEFT)
    output   = base(x) + (sum_{e in S} c_e s_e B_e)(sum_{e in S} c_e A_e) h   mixing="parameter" (mttl)

The experts are stored once, concatenated in rank space (different ranks per expert are fine)::

    A   (R, in)    rows  [off_e, off_e + r_e) are A_e                         R = sum_e r_e
    Bt  (R, out)   rows  [off_e, off_e + r_e) are (s_e * B_e)^T, scale folded in

and the low-rank part runs by one of three *strategies*, none of which ever forms a
(tokens x experts x out_features) tensor:

``dense``    rank space over all experts: ``((h @ A^T) * mask(c)) @ Bt``. Cost ~ t*R*(in+out) MACs,
             no gathers, no host sync, no data-dependent shapes (what ``torch.compile`` and CUDA graphs
             want). Best while R is small or t is small on a GPU.
``gather``   per token, gather the top-k experts' factors (uniform ranks only):
             ``(A[S] h) * c -> @ Bt[S]``. Cost ~ t*k*r*(in+out) but memory-bound (the gathered factors
             are t*k*r*(in+out) elements); best for a few tokens (decoding) with many experts.
``grouped``  sort the t*k (token, expert) pairs by expert, one pair of small GEMMs per expert that was
             chosen at least once. Cost ~ t*k*r*(in+out) plus a fixed overhead per used expert (and a
             host sync to read the counts). Best for long inputs (prefill) with many experts on CPU.

A router that uses every expert (``uniform``) gives each weight 1/E instead of top-k and softmax.
Inside a :meth:`~libstore.router.model.RoutedModel.sequence_routing` or ``pinned`` block the experts
and weights are per sequence, not per token (:mod:`libstore.router.sequence`); the strategies below
are the same.

``strategy="auto"`` picks, per call, the cheapest by :func:`choose_strategy` (estimated time from the
token count t, E, ranks and layer shape; CPU constants fitted on the 2-core dev machine, CUDA ones
estimated). Under ``torch.compile`` ``grouped`` is never picked (its per-expert loop depends on data),
so a compiled model has no graph breaks. The scores (t x E) are the only tensor whose size grows with
E besides the dense path's t x E*r rank-space activations.

PEFT facts matched (peft 0.21.2, ``tuners/lora/arrow.py``): scores are ``abs(tok @ prototypes.T)`` in the
adapter dtype, which is float32 (PEFT upcasts fp16/bf16 adapter weights to fp32 by default,
``autocast_adapter_dtype=True``) - libstore always scores in fp32; top-k is ``torch.topk`` over the experts
in load order (so ties break the same way); the softmax runs over the top-k scores divided by the
temperature (PEFT fills the rest with -inf, which gives the same numbers); the base output and the
delta are added in the wider of the two dtypes and cast back to the base output's dtype. PEFT raises
at the first forward when top_k > E; libstore clamps top_k to the module's E (same result as top_k=E).
PEFT applies its router's dropout (p=0, an identity) to the delta; the router here has no dropout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from libstore.errors import RouterError
from libstore.router.routers import Arrow, Router
from libstore.router.sequence import SequenceRoutes
from libstore.types import MIXINGS, STRATEGIES, Mixing, Strategy


class RouteRecorder(Protocol):
    """What a routed layer reports to while tracing (see :mod:`libstore.router.trace`)."""

    def record(self, module: str, experts: Tensor, weights: Tensor) -> None: ...


@dataclass(frozen=True)
class CostModel:
    """Time estimates of the three strategies' low-rank part, in nanoseconds (see choose_strategy).

    Attributes:
        gemm: multiply-accumulates per ns in a GEMM with a skinny side (t x in @ in x R).
        weight_read: ns per expert-weight element the dense path streams (its fixed floor at small t).
        gather: ns per factor element a gather-and-batched-GEMV touches (no reuse: memory bound).
        pair_move: ns per element of the per-pair rows the grouped path copies (gather, write, add).
        per_expert: ns of fixed cost per expert segment of the grouped path (2 GEMM calls + views).
        dense_fixed, gather_fixed, grouped_fixed: ns of fixed cost per call (launches, sort, sync).
        gather_max: the most factor elements the gather path may touch in one call (cache-sized).
    """

    gemm: float
    weight_read: float
    gather: float
    pair_move: float
    per_expert: float
    dense_fixed: float
    gather_fixed: float
    grouped_fixed: float
    gather_max: int


COST_MODELS: dict[str, CostModel] = {
    # Fitted to 1-thread thread-time measurements on the 2-core AMD EPYC dev VM (torch 2.13, fp32,
    # r = 8, in/out in {512, 1376}, t in 1..1024, E in 8..256; benchmarks/router.py --calibrate).
    "cpu": CostModel(
        gemm=45.0,
        weight_read=0.08,
        gather=0.7,
        pair_move=0.36,
        per_expert=5e3,
        dense_fixed=30e3,
        gather_fixed=20e3,
        grouped_fixed=70e3,
        gather_max=1 << 21,
    ),
    # Not measured (no GPU in the dev environment): an H100-class estimate. Launches ~5-10 us, the
    # grouped path's counts need a device->host sync and each segment is ~3 launches, so on a GPU it
    # only wins at very large E x t; dense (no sync, CUDA-graph friendly) is the usual choice.
    "cuda": CostModel(
        gemm=2.5e4,
        weight_read=0.002,
        gather=0.004,
        pair_move=0.004,
        per_expert=15e3,
        dense_fixed=10e3,
        gather_fixed=10e3,
        grouped_fixed=60e3,
        gather_max=1 << 26,
    ),
}


def choose_strategy(
    *,
    tokens: int,
    experts: int,
    total_rank: int,
    top_k: int,
    max_rank: int,
    in_features: int,
    out_features: int,
    uniform_rank: bool,
    device_type: str,
    compiling: bool = False,
) -> Strategy:
    """The cost rule of ``strategy="auto"``: the cheapest of the three by estimated time.

    With t tokens, E experts of total rank R (max rank r), k = min(top_k, E), io = in + out, and the
    constants of :data:`COST_MODELS` for the device type (unknown types use the CUDA ones)::

        dense   = dense_fixed + t*R*io / gemm + R*io * weight_read
        gather  = gather_fixed + t*k*r*io * gather                  if ranks are equal, t*k*r*io <= gather_max
        grouped = grouped_fixed + used * per_expert + t*k*r*io / gemm + t*k*(in + 2*out) * pair_move
                  used = E * (1 - (1 - 1/E)^(t*k)), the expected number of distinct experts chosen

    The scores (t x E x in) are the same for all three and are left out. On this CPU the rule gives:
    E <= 8 -> dense at any t; E = 32 -> dense up to ~16 tokens, grouped beyond; E >= 128 -> gather for
    a handful of tokens (decoding), grouped for longer inputs. Never ``grouped`` while compiling
    (its per-expert loop depends on the data).
    """
    c = COST_MODELS.get(device_type, COST_MODELS["cuda"])
    t = float(tokens)
    io = in_features + out_features
    k = min(top_k, experts)
    lowrank = t * k * max_rank * io
    best: Strategy = "dense"
    best_cost = c.dense_fixed + t * total_rank * io / c.gemm + total_rank * io * c.weight_read
    if uniform_rank and lowrank <= c.gather_max:
        cost = c.gather_fixed + lowrank * c.gather
        if cost < best_cost:
            best, best_cost = "gather", cost
    if not compiling:
        used = experts * (1.0 - (1.0 - 1.0 / experts) ** (t * k))
        cost = (
            c.grouped_fixed
            + used * c.per_expert
            + lowrank / c.gemm
            + t * k * (in_features + 2 * out_features) * c.pair_move
        )
        if cost < best_cost:
            best, best_cost = "grouped", cost
    return best


def layer_features(module: nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer LoRA can adapt, else ``None``.

    Those are ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's ``c_attn``/``c_proj``/``c_fc``),
    whose weight is (in, out) (PEFT's ``fan_in_fan_out``); both compute ``x @ W + b`` on the last
    dimension, so the routed update ``x A^T B^T`` is the same for either. ``Conv1D`` is recognised by
    its class and attributes, so this module does not import transformers.
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ == "Conv1D"
        and type(module).__module__.startswith("transformers.")
        and isinstance(weight, Tensor)
        and weight.ndim == 2
        and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
    ):
        return int(weight.shape[0]), int(weight.shape[1])
    return None


class RoutedLinear(nn.Module):
    """A base ``nn.Linear`` (or ``Conv1D``) whose output adds the routed sum of its experts' LoRA updates.

    Built by :func:`libstore.router.build.build_router`; the constructor takes already stacked
    tensors. Expert weights and router keys are non-persistent buffers, so ``.to()`` moves them with
    the model and ``state_dict()`` holds only the base weights.

    Attributes:
        base_layer: the original ``nn.Linear`` or ``Conv1D`` (its parameters are never changed).
        name: the module's name in the base model (``model.layers.0.self_attn.q_proj``).
        router: how tokens are scored (:mod:`libstore.router.routers`; Arrow by default).
        top_k, temperature, mixing, strategy: routing settings; plain attributes, may be changed.
        ranks: rank of each of this module's experts, in order.
        key_rows: router key rows of each expert, in order (Arrow: 1 each).
        expert_ids: (E,) long buffer, index of each local expert in the router's expert list.
        prototypes: (M, in) float32 buffer, the router's keys stacked by expert (Arrow: (E, in)).
        lora_A: (R, in) buffer. lora_Bt: (R, out) buffer, scale folded in.
    """

    prototypes: Tensor
    lora_A: Tensor
    lora_Bt: Tensor
    expert_ids: Tensor
    rank_owner: Tensor
    key_owner: Tensor

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        name: str,
        prototypes: Tensor,
        lora_A: Tensor,
        lora_Bt: Tensor,
        ranks: Sequence[int],
        expert_ids: Sequence[int] | Tensor,
        top_k: int,
        temperature: float,
        mixing: Mixing = "output",
        strategy: Strategy = "auto",
        router: Router | None = None,
        key_rows: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        E = len(ranks)
        R = sum(ranks)
        if E == 0:
            raise RouterError(f"{name}: a routed module needs at least one expert")
        features = layer_features(base_layer)
        if features is None:
            raise RouterError(f"{name}: a {type(base_layer).__name__} cannot be routed (nn.Linear or Conv1D)")
        n_in, n_out = features
        rows = tuple(int(n) for n in key_rows) if key_rows is not None else (1,) * E
        if len(rows) != E or tuple(prototypes.shape) != (sum(rows), n_in):
            raise RouterError(
                f"{name}: router keys have shape {tuple(prototypes.shape)}, "
                f"expected ({sum(rows)}, {n_in}) for key rows {list(rows)}"
            )
        if tuple(lora_A.shape) != (R, n_in) or tuple(lora_Bt.shape) != (
            R,
            n_out,
        ):
            raise RouterError(f"{name}: stacked factors do not match ranks {list(ranks)}")
        if mixing not in MIXINGS:
            raise RouterError(f"unknown mixing {mixing!r}; use one of {MIXINGS}")
        if mixing == "parameter" and len(set(ranks)) > 1:
            raise RouterError(
                f"{name}: mixing='parameter' sums A and B matrices, which needs equal ranks; "
                f"got ranks {sorted(set(ranks))}. Use mixing='output'."
            )
        self.base_layer = base_layer
        self.name = name
        self.router: Router = router if router is not None else Arrow()
        self.key_rows: tuple[int, ...] = rows
        self._rows_each: int | None = rows[0] if len(set(rows)) == 1 else None
        self.in_features = n_in
        self.out_features = n_out
        self.ranks: tuple[int, ...] = tuple(int(r) for r in ranks)
        self.uniform_rank = len(set(self.ranks)) == 1
        self.max_rank = max(self.ranks)
        self.top_k = int(top_k)
        self.temperature = float(temperature)
        self.mixing: Mixing = mixing
        self.strategy: Strategy = strategy
        self._trace: RouteRecorder | None = None
        self._seq: SequenceRoutes | None = None
        self._last_strategy: str | None = None
        self.register_buffer("prototypes", prototypes, persistent=False)
        self.register_buffer("lora_A", lora_A, persistent=False)
        self.register_buffer("lora_Bt", lora_Bt, persistent=False)
        ids = torch.as_tensor(expert_ids, dtype=torch.long, device=prototypes.device)
        self.register_buffer("expert_ids", ids, persistent=False)
        owner = torch.tensor(
            [e for e, r in enumerate(self.ranks) for _ in range(r)],
            device=lora_A.device,
        )
        self.register_buffer("rank_owner", owner, persistent=False)
        key_owner = torch.tensor(
            [e for e, n in enumerate(rows) for _ in range(n)], dtype=torch.long, device=prototypes.device
        )
        self.register_buffer("key_owner", key_owner, persistent=False)

    # -- introspection ---------------------------------------------------------------------------

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    @property
    def k(self) -> int:
        """Experts per token: ``min(top_k, E)``, or E for a router that uses every expert."""
        return self.num_experts if self.router.all_experts else min(self.top_k, self.num_experts)

    def extra_repr(self) -> str:
        return (
            f"router={self.router.name}, experts={self.num_experts}, ranks={sorted(set(self.ranks))}, "
            f"top_k={self.top_k}, "
            f"temperature={self.temperature}, mixing={self.mixing!r}, strategy={self.strategy!r}"
        )

    def pick_strategy(self, tokens: int) -> str:
        """The strategy a forward over ``tokens`` tokens uses (``auto`` resolved)."""
        if self.strategy != "auto":
            if self.strategy == "gather" and not self.uniform_rank:
                raise RouterError(f"{self.name}: strategy='gather' needs equal ranks")
            return self.strategy
        return choose_strategy(
            tokens=tokens,
            experts=self.num_experts,
            total_rank=self.lora_A.shape[0],
            top_k=self.k,
            max_rank=self.max_rank,
            in_features=self.in_features,
            out_features=self.out_features,
            uniform_rank=self.uniform_rank,
            device_type=self.lora_A.device.type,
            compiling=torch.compiler.is_compiling(),
        )

    # -- routing ---------------------------------------------------------------------------------

    def scores(self, h: Tensor) -> Tensor:
        """The router's scores (t, E) fp32 for tokens h (t, in)."""
        h32 = h if h.dtype == torch.float32 else h.float()
        P = (
            self.prototypes if self.prototypes.dtype == torch.float32 else self.prototypes.float()
        )  # after .half()
        return self.router.score(h32, P, self._rows_each, self.key_owner, self.num_experts)

    def route(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Top-k experts (t, k) long and their softmax weights (t, k) float32 for tokens h (t, in)."""
        t, E = h.shape[0], self.num_experts
        if self.router.all_experts:
            idx = torch.arange(E, device=h.device).expand(t, E)
            return idx, torch.full((t, E), 1.0 / E, dtype=torch.float32, device=h.device)
        top, idx = torch.topk(self.scores(h), self.k, dim=1)  # torch.topk: PEFT's order and ties
        coef = torch.softmax(top / self.temperature, dim=1)
        return idx, coef

    # -- per-sequence routing (see libstore.router.sequence) ------------------------------------

    def _sequence_route(
        self, h: Tensor, lead: tuple[int, ...], state: SequenceRoutes
    ) -> tuple[Tensor, Tensor]:
        """Each sequence's experts for every one of its tokens: decided at this module's first call
        inside the block (or given), then reused; (t, k) local indices and weights."""
        t = h.shape[0]
        batch = lead[0] if len(lead) >= 2 else 1
        if t % batch:
            raise RouterError(f"{self.name}: {t} tokens do not split into {batch} sequences")
        per = t // batch
        local = state.local.get(self.name)
        if local is None:
            got = state.routes.get(self.name)
            if got is None:
                got = state.every if state.every is not None else self._decide(h, batch, per, state.mask)
                got = (got[0].to(h.device), got[1].to(device=h.device, dtype=torch.float32))
                state.routes[self.name] = got
            local = self.to_local(*got)
            state.local[self.name] = local
        idx, weights = local
        if idx.shape[0] != batch:
            raise RouterError(
                f"{self.name}: the sequence routes are for {idx.shape[0]} sequences but this call has "
                f"{batch}; route each batch in its own block (beam search is not supported)"
            )
        return idx.repeat_interleave(per, 0), weights.repeat_interleave(per, 0)

    def _decide(self, h: Tensor, batch: int, per: int, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per sequence: top-k of the router's scores averaged over its (unmasked) tokens."""
        E = self.num_experts
        if self.router.all_experts:
            ids = self.expert_ids.expand(batch, E)
            return ids, torch.full((batch, E), 1.0 / E, dtype=torch.float32, device=h.device)
        s = self.scores(h).view(batch, per, E)
        if mask is not None:
            if tuple(mask.shape) != (batch, per):
                raise RouterError(
                    f"{self.name}: the attention mask has shape {tuple(mask.shape)} but the call that "
                    f"decides the routes has {batch} sequences of {per} tokens"
                )
            m = mask.to(device=s.device, dtype=s.dtype).unsqueeze(-1)
            mean = (s * m).sum(1) / m.sum(1).clamp_min(1.0)
        else:
            mean = s.mean(1)
        top, idx = torch.topk(mean, self.k, dim=1)
        return self.expert_ids[idx], torch.softmax(top / self.temperature, dim=1)

    def to_local(self, ids: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
        """Router-wide expert ids -> this module's local indices; experts it lacks get weight 0."""
        n = int(max(int(self.expert_ids.max()), int(ids.max()))) + 1
        lookup = torch.full((n,), -1, dtype=torch.long, device=ids.device)
        lookup[self.expert_ids.to(ids.device)] = torch.arange(self.num_experts, device=ids.device)
        local = lookup[ids]
        weights = torch.where(local >= 0, weights, torch.zeros_like(weights))
        return local.clamp_min(0), weights

    def forward(self, x: Tensor) -> Tensor:
        result: Tensor = self.base_layer(x)
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features)
        t = h.shape[0]
        if t == 0:
            return result
        if self._seq is not None:
            idx, coef = self._sequence_route(h, tuple(lead), self._seq)
        else:
            idx, coef = self.route(h)
        if self._trace is not None:
            self._trace.record(self.name, self.expert_ids[idx], coef)
        hc = h.to(self.lora_A.dtype)
        c = coef.to(self.lora_A.dtype)
        strategy = self.pick_strategy(t)
        self._last_strategy = strategy
        # Accumulate into the base output, in the wider of its dtype and the experts' (PEFT adds
        # result + delta with type promotion, then casts back). In place when autograd is off and no
        # hook of the base layer could hold on to its output.
        wide = torch.promote_types(result.dtype, self.lora_A.dtype)
        tracking = torch.is_grad_enabled() and (
            result.requires_grad or hc.requires_grad or self.lora_A.requires_grad
        )
        inplace = not tracking and not self.base_layer._forward_hooks
        if wide == hc.dtype:  # the usual case: accumulate straight into (a widened copy of) the output
            acc = result.reshape(t, self.out_features)
            if acc.dtype != wide:
                acc = acc.to(wide)
        else:  # factors narrower than the output (bf16 experts on an fp32 model): delta apart
            acc = torch.zeros(t, self.out_features, dtype=hc.dtype, device=hc.device)
        if strategy == "dense":
            acc = self._dense(hc, idx, c, acc, inplace)
        elif strategy == "gather":
            acc = self._gather(hc, idx, c, acc, inplace)
        elif strategy == "grouped":
            acc = self._grouped(hc, idx, c, acc, inplace)
        else:
            raise RouterError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
        if wide != hc.dtype:
            return result + acc.view(*lead, self.out_features)
        return acc.view(*lead, self.out_features).to(result.dtype)

    # dense: rank space over all experts ---------------------------------------------------------

    def _dense(self, h: Tensor, idx: Tensor, c: Tensor, acc: Tensor, inplace: bool) -> Tensor:
        t, E = h.shape[0], self.num_experts
        # scatter_add_: pinned routes may repeat an index (with weight 0); equal to scatter_ otherwise
        w = torch.zeros(t, E, dtype=c.dtype, device=c.device).scatter_add_(1, idx, c)  # (t, E)
        z = h @ self.lora_A.T  # (t, R)
        if self.mixing == "parameter":  # uniform rank r: v = sum_e c_e A_e h, then sum_e c_e B_e v
            r = self.max_rank
            v = torch.bmm(w.unsqueeze(1), z.view(t, E, r)).squeeze(1)  # (t, r)
            z = (w.unsqueeze(2) * v.unsqueeze(1)).view(t, E * r)
        elif self.uniform_rank:
            z = (z.view(t, E, self.max_rank) * w.unsqueeze(2)).view(t, -1)
        else:
            z = z * w.index_select(1, self.rank_owner)
        return acc.addmm_(z, self.lora_Bt) if inplace else torch.addmm(acc, z, self.lora_Bt)

    # gather: per-token factors of the chosen experts (uniform rank) -----------------------------

    def _gather(self, h: Tensor, idx: Tensor, c: Tensor, acc: Tensor, inplace: bool) -> Tensor:
        t, k = idx.shape
        r, E = self.max_rank, self.num_experts
        A3 = self.lora_A.view(E, r, self.in_features)
        B3 = self.lora_Bt.view(E, r, self.out_features)
        u = torch.bmm(A3[idx].view(t, k * r, self.in_features), h.unsqueeze(2)).view(t, k, r)
        if self.mixing == "parameter":
            v = torch.bmm(c.unsqueeze(1), u).squeeze(1)  # (t, r)
            z = c.unsqueeze(2) * v.unsqueeze(1)  # (t, k, r)
        else:
            z = u * c.unsqueeze(2)
        z = z.view(t, 1, k * r)
        Bg = B3[idx].view(t, k * r, self.out_features)
        acc3 = acc.view(t, 1, self.out_features)
        acc3 = acc3.baddbmm_(z, Bg) if inplace else torch.baddbmm(acc3, z, Bg)
        return acc3.view(t, self.out_features)

    # grouped: (token, expert) pairs sorted by expert, one segment per used expert ---------------

    def _segments(self) -> tuple[list[Tensor], list[Tensor]]:
        """Per-expert views A_e^T (in, r_e) and (s_e B_e)^T (r_e, out), rebuilt if the buffers moved."""
        key = (self.lora_A.data_ptr(), self.lora_Bt.data_ptr(), self.lora_A.device)
        cached = getattr(self, "_segment_cache", None)
        if cached is None or cached[0] != key:
            a = [a.T for a in torch.split(self.lora_A, list(self.ranks))]
            b = list(torch.split(self.lora_Bt, list(self.ranks)))
            cached = (key, a, b)
            self._segment_cache = cached
        return cached[1], cached[2]

    def _grouped(self, h: Tensor, idx: Tensor, c: Tensor, acc: Tensor, inplace: bool) -> Tensor:
        t, k = idx.shape
        A_t, B = self._segments()
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # host sync
        spans: list[tuple[int, int, int]] = []  # (expert, start, end) in sorted pair order
        start = 0
        for e, n in enumerate(counts):
            if n:
                spans.append((e, start, start + n))
                start += n
        pair_tok = order // k  # token of each pair, pairs sorted by expert
        cs = c.reshape(-1).index_select(0, order).unsqueeze(1)  # (t*k, 1)
        hs = h.index_select(0, pair_tok)  # (t*k, in)

        def segment_mm(rows: Tensor | list[Tensor], weights: list[Tensor], width: int) -> Tensor:
            """rows of each span @ that expert's weight, stacked in pair order: (t*k, width)."""
            parts = rows if isinstance(rows, list) else [rows[a:b] for _, a, b in spans]
            if not inplace:  # autograd must see every product
                return torch.cat([torch.mm(p, weights[e]) for p, (e, _, _) in zip(parts, spans, strict=True)])
            out = h.new_empty(t * k, width)
            for p, (e, a, b) in zip(parts, spans, strict=True):
                torch.mm(p, weights[e], out=out[a:b])
            return out

        if self.uniform_rank:
            zs = segment_mm(hs, A_t, self.max_rank) * cs  # (t*k, r), coefficients in rank space
            if self.mixing == "parameter":  # v_tok = sum_j c_j A_j h; each pair then carries c_j v_tok
                v = torch.zeros(t, self.max_rank, dtype=zs.dtype, device=zs.device).index_add_(
                    0, pair_tok, zs
                )
                zs = v.index_select(0, pair_tok) * cs
            z: Tensor | list[Tensor] = zs
        else:
            z = [torch.mm(hs[a:b], A_t[e]) * cs[a:b] for e, a, b in spans]
        ys = segment_mm(z, B, self.out_features)  # (t*k, out)
        return acc.index_add_(0, pair_tok, ys) if inplace else acc.index_add(0, pair_tok, ys)


def dense_reference(
    h: Tensor,
    prototypes: Tensor,
    As: Sequence[Tensor],
    Bs: Sequence[Tensor],
    scales: Sequence[float],
    *,
    top_k: int,
    temperature: float = 1.0,
    mixing: Mixing = "output",
    scores: Tensor | None = None,
) -> Tensor:
    """The routed delta by a plain per-token, per-expert loop (slow; for tests and documentation).

    h (t, in); prototypes (E, in); As[e] (r_e, in); Bs[e] (out, r_e). Returns (t, out) in float64.
    ``scores`` (t, E) replaces Arrow's |<h, prototype>| (another router's scores, computed apart).
    """
    h64 = h.double()
    if scores is None:
        scores = (h.float() @ prototypes.float().T).abs()  # selection as the layer does it, in fp32
    k = min(top_k, len(As))
    out = torch.zeros(h.shape[0], Bs[0].shape[0], dtype=torch.float64)
    for i in range(h.shape[0]):
        top, idx = torch.topk(scores[i], k)
        c = torch.softmax(top / temperature, dim=0)
        if mixing == "output":
            for j, e in enumerate(idx.tolist()):
                out[i] += c[j] * scales[e] * (Bs[e].double() @ (As[e].double() @ h64[i]))
        else:
            A = sum(c[j] * As[e].double() for j, e in enumerate(idx.tolist()))
            B = sum(c[j] * scales[e] * Bs[e].double() for j, e in enumerate(idx.tolist()))
            out[i] = B @ (A @ h64[i])
    return out


__all__ = [
    "RouteRecorder",
    "RoutedLinear",
    "choose_strategy",
    "dense_reference",
]
