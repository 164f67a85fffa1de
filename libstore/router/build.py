"""Turn a transformers model and in-memory expert tensors into a routed model (Arrow by default).

The input is plain typed data - one :class:`ExpertTensors` per expert - so the caller (the catalog's
loader, a test, a benchmark) decides where tensors come from. :func:`build_router` reads each expert's
tensors once, stacks them per module in rank space, computes the prototypes it was not given in a few
batched calls, and replaces each targeted ``nn.Linear`` (or transformers ``Conv1D``, GPT-2) by a
:class:`~libstore.router.layer.RoutedLinear` (set on its parent; the base layer lives on inside it,
its parameters untouched). One walk over the
module tree, whatever the number of experts.

API::

    @dataclass(frozen=True)
    class ExpertTensors:
        name: str
        scale: float                                   # alpha/r, or alpha/sqrt(r) with rsLoRA
        modules: Mapping[str, tuple[Tensor, Tensor]]   # module name -> (A (r, in), B (out, r))

    build_router(
        model, experts, *,
        general=(),                  # GenKnowSub: general experts, subtracted from each task expert
                                     # (PEFT's use_gks)
        router="arrow",              # a name of libstore.router.routers.ROUTERS or a Router object
        prototypes=None,             # {module: (M_m, in)} precomputed router keys (Arrow: (E_m, in)),
                                     # rows in order of the experts having the module
        prototype_fn=exact_prototype_fn,   # Arrow's: or peft_prototype_fn(seed=...), or any (A, B) -> (N, in)
        top_k=3, temperature=1.0,
        granularity="token",         # "token" | "sequence" (route each sequence once, from the prompt)
        mixing="output",             # "output" (PEFT) | "parameter" (mttl)
        strategy="auto",             # "auto" | "dense" | "gather" | "grouped" (see layer.py)
        dtype=None,                  # expert factors' dtype; default float32 (PEFT's autocast_adapter_dtype)
        device=None,                 # default: each module's base weight device
    ) -> RoutedModel

Semantics (those of ``peft.create_arrow_model``): each module routes over the experts that have it,
in the order they are given (which decides top-k ties, like PEFT's task_0, task_1, ... order). With
``general`` experts, each task expert's A and B become ``A - mean_g A_g`` and ``B - mean_g B_g``
(:func:`libstore.lowrank.gks.subtract_general_param`, bit-identical to PEFT) *before* prototypes are
computed; the general experts themselves are not routed. Precomputed ``prototypes`` must be those of
the experts as routed (of the residuals when ``general`` is given).

Differences from PEFT, on purpose: experts may have different ranks, scales and module subsets (PEFT
requires equal ranks and module names); ``top_k`` larger than a module's expert count is clamped (PEFT
raises at the first forward); prototypes are exact by default (PEFT's 15-step power iteration often has
not converged; ``peft_prototype_fn(seed=...)`` reproduces it bit for bit for comparisons).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from libstore.errors import LibstoreError, RouterError
from libstore.lowrank.gks import subtract_general_param
from libstore.router.layer import RoutedLinear, layer_features
from libstore.router.model import RoutedModel
from libstore.router.routers import (
    Arrow,
    PrototypeFn,
    Router,
    exact_prototype_fn,
    make_router,
    peft_prototype_fn,
)
from libstore.types import MIXINGS, STRATEGIES, Granularity, Mixing, Strategy

__all__ = [
    "ExpertTensors",
    "PrototypeFn",
    "build_router",
    "exact_prototype_fn",
    "peft_prototype_fn",
]


@dataclass(frozen=True)
class ExpertTensors:
    """One expert's LoRA factors, in memory.

    Attributes:
        name: the expert's name (unique within one router; traces report it).
        scale: LoRA scale s of every module: alpha/r, or alpha/sqrt(r) with rsLoRA.
        modules: base-model module name (``model.layers.0.self_attn.q_proj``) -> (A, B) with
            A (r, in) and B (out, r), PEFT's ``lora_A.weight`` / ``lora_B.weight`` layout. Ranks may
            differ between experts; an expert may target any subset of the model's Linear modules.
    """

    name: str
    scale: float
    modules: Mapping[str, tuple[Tensor, Tensor]]


@dataclass
class _Entry:
    """One (module, expert) pair on its way into a stacked bank."""

    expert: int
    A: Tensor
    B: Tensor
    scale: float


def build_router(
    model: nn.Module,
    experts: Sequence[ExpertTensors],
    *,
    general: Sequence[ExpertTensors] = (),
    router: str | Router = "arrow",
    prototypes: Mapping[str, Tensor] | None = None,
    prototype_fn: PrototypeFn = exact_prototype_fn,
    top_k: int = 3,
    temperature: float = 1.0,
    mixing: Mixing = "output",
    strategy: Strategy = "auto",
    granularity: Granularity = "token",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> RoutedModel:
    """Patch ``model`` in place so that every module any expert targets routes over the experts.

    Returns a :class:`~libstore.router.model.RoutedModel` (``unpatch()`` restores the plain model).
    All checks run and all tensors are prepared before the first module is replaced, so a failed
    build leaves the model as it was.

    Raises:
        RouterError: no experts, duplicate names, bad settings, a module that is missing or not an
            ``nn.Linear`` / ``Conv1D`` or already routed, factor shapes that do not fit the module,
            GenKnowSub with general experts that miss a module or have another rank, bad precomputed
            keys, an unknown router or a ``prototype_fn`` given with a router that is not Arrow.
    """
    _check_settings(experts, general, top_k, temperature, mixing, strategy)
    rt = _make(router, prototype_fn)
    per_module = _collect(experts)
    named = dict(model.named_modules())
    linears = {m: _resolve_linear(named, m) for m in per_module}
    for m, entries in per_module.items():
        for en in entries:
            _check_shapes(m, experts[en.expert].name, en.A, en.B, linears[m][1])
    if general:
        _gen_know_sub(per_module, general, [e.name for e in experts])
    given = dict(prototypes or {})
    unknown = sorted(set(given) - set(per_module))
    if unknown:
        raise RouterError(f"prototypes given for modules no expert targets: {unknown[:5]}")

    layers: dict[str, RoutedLinear] = {}
    for m, entries in per_module.items():
        lin = linears[m][0]
        ranks = [en.A.shape[0] for en in entries]
        # one copy of each factor: A rows (R, in), B^T rows (R, out) in >= fp32 (scale folded below)
        wide = torch.float32
        for en in entries:
            wide = torch.promote_types(wide, torch.promote_types(en.A.dtype, en.B.dtype))
        src = entries[0].A.device
        A_cat = torch.cat([en.A.to(src) for en in entries]).to(wide)
        Bt_cat = torch.cat([en.B.T.to(src) for en in entries]).to(wide)
        scales = [en.scale for en in entries]
        rows = [rt.key_rows(en.A.shape[0], en.A.shape[1], en.B.shape[0]) for en in entries]
        keys = _module_keys(m, ranks, rows, scales, A_cat, Bt_cat, given.get(m), rt)
        row_scale = [en.scale for en in entries for _ in range(en.A.shape[0])]
        Bt_cat.mul_(torch.tensor(row_scale, dtype=wide, device=Bt_cat.device).unsqueeze(1))
        dev = torch.device(device) if device is not None else next(lin.parameters()).device
        dt = dtype or torch.float32
        layers[m] = RoutedLinear(
            lin,
            name=m,
            prototypes=keys.to(device=dev, dtype=torch.float32).contiguous(),
            lora_A=A_cat.to(device=dev, dtype=dt).contiguous(),
            lora_Bt=Bt_cat.to(device=dev, dtype=dt).contiguous(),
            ranks=ranks,
            expert_ids=[en.expert for en in entries],
            top_k=top_k,
            temperature=temperature,
            mixing=mixing,
            strategy=strategy,
            router=rt,
            key_rows=rows,
        )
    routed = RoutedModel(model, layers, tuple(e.name for e in experts), granularity)
    for m, layer in layers.items():  # nothing below can fail: patch all or nothing
        parent, _, attr = m.rpartition(".")
        setattr(named[parent] if parent else model, attr, layer)
    return routed


def _make(router: str | Router, prototype_fn: PrototypeFn) -> Router:
    """The router object; Arrow by name takes ``prototype_fn`` (any other router must not)."""
    custom = prototype_fn is not exact_prototype_fn
    if isinstance(router, str):
        if router == "arrow":
            return Arrow(prototype_fn=prototype_fn if custom else None)
        rt = make_router(router)
    else:
        rt = router
    if custom:
        raise RouterError(f"prototype_fn applies to the arrow router only, not to {rt.name!r}")
    return rt


# -- steps -----------------------------------------------------------------------------------------


def _check_settings(
    experts: Sequence[ExpertTensors],
    general: Sequence[ExpertTensors],
    top_k: int,
    temperature: float,
    mixing: str,
    strategy: str,
) -> None:
    if len(experts) == 0:
        raise RouterError("a router needs at least one expert")
    dupes = sorted(n for n, c in Counter(e.name for e in experts).items() if c > 1)
    if dupes:
        raise RouterError(f"expert names must be unique within a router; repeated: {dupes}")
    if not isinstance(top_k, int) or top_k < 1:
        raise RouterError(f"top_k must be a positive integer, got {top_k!r}")
    if not temperature > 0:
        raise RouterError(f"temperature must be > 0, got {temperature!r}")
    if mixing not in MIXINGS:
        raise RouterError(f"unknown mixing {mixing!r}; use one of {MIXINGS}")
    if strategy not in STRATEGIES:
        raise RouterError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    if general and not all(g.modules for g in general):
        raise RouterError("every general expert must have at least one module")


def _collect(experts: Sequence[ExpertTensors]) -> dict[str, list[_Entry]]:
    """module -> its experts in the given order; reads each expert's tensors once."""
    per_module: dict[str, list[_Entry]] = {}
    for i, ex in enumerate(experts):
        if not ex.modules:
            raise RouterError(f"expert {ex.name!r} has no modules")
        for m, (A, B) in ex.modules.items():
            per_module.setdefault(m, []).append(_Entry(i, A.detach(), B.detach(), float(ex.scale)))
    return per_module


def _resolve_linear(named: Mapping[str, nn.Module], m: str) -> tuple[nn.Module, tuple[int, int]]:
    """The module ``m`` and its (in, out) features; it must be an ``nn.Linear`` or ``Conv1D``."""
    mod = named.get(m)
    if mod is None:
        raise RouterError(
            f"the model has no module {m!r}; experts must target this base model's Linear or Conv1D layers"
        )
    if isinstance(mod, RoutedLinear):
        raise RouterError(f"module {m!r} is already routed; unpatch() the existing router first")
    features = layer_features(mod)
    if features is None:
        raise RouterError(
            f"module {m!r} is a {type(mod).__module__}.{type(mod).__name__}; only nn.Linear and "
            f"transformers Conv1D layers can be routed"
        )
    return mod, features


def _check_shapes(m: str, expert: str, A: Tensor, B: Tensor, features: tuple[int, int]) -> None:
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1] or A.shape[0] == 0:
        raise RouterError(
            f"expert {expert!r}, module {m!r}: expected A (r, in) and B (out, r), "
            f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
        )
    n_in, n_out = features
    if A.shape[1] != n_in or B.shape[0] != n_out:
        raise RouterError(
            f"expert {expert!r}, module {m!r}: factors are for a ({B.shape[0]} x {A.shape[1]}) layer but "
            f"the model's layer is ({n_out} x {n_in}); wrong base model?"
        )
    if not (A.dtype.is_floating_point and B.dtype.is_floating_point):
        raise RouterError(f"expert {expert!r}, module {m!r}: factors must be floating point")


def _gen_know_sub(
    per_module: dict[str, list[_Entry]],
    general: Sequence[ExpertTensors],
    task_names: Sequence[str],
) -> None:
    """Replace each task entry's A, B by A - mean_g A_g, B - mean_g B_g (PEFT's use_gks)."""
    for m, entries in per_module.items():
        missing = [g.name for g in general if m not in g.modules]
        if missing:
            raise RouterError(
                f"GenKnowSub: general expert(s) {missing} have no module {m!r}, which task experts target; "
                "every general expert must cover every routed module (as PEFT requires)"
            )
        gA = [g.modules[m][0].detach() for g in general]
        gB = [g.modules[m][1].detach() for g in general]
        by_rank: dict[int, list[_Entry]] = {}
        for en in entries:
            by_rank.setdefault(en.A.shape[0], []).append(en)
        for group in by_rank.values():  # one batched call per rank: the generals broadcast as views
            n = len(group)
            A = torch.stack([en.A for en in group])
            B = torch.stack([en.B for en in group])
            try:
                A2, B2 = subtract_general_param(
                    A,
                    B,
                    [a.expand(n, *a.shape) for a in gA],
                    [b.expand(n, *b.shape) for b in gB],
                )
            except LibstoreError as e:
                names = [task_names[en.expert] for en in group]
                raise RouterError(f"GenKnowSub on module {m!r} (experts {names}): {e}") from e
            for j, en in enumerate(group):
                en.A, en.B = A2[j], B2[j]


def _module_keys(
    m: str,
    ranks: Sequence[int],
    rows: Sequence[int],
    scales: Sequence[float],
    A_cat: Tensor,
    Bt_cat: Tensor,
    given: Tensor | None,
    router: Router,
) -> Tensor:
    """(M, in) router keys of one module: the given ones (checked), else the router's, batched.

    A_cat (R, in) and Bt_cat (R, out, unscaled) are the stacked factors; equal ranks feed the router
    views of them (no copy), mixed ranks one batch per rank. ``rows[j]`` keys per expert j.
    """
    E, n_in, M = len(ranks), A_cat.shape[1], sum(rows)
    if given is not None:
        if tuple(given.shape) != (M, n_in):
            raise RouterError(
                f"prototypes for {m!r} have shape {tuple(given.shape)}, expected {(M, n_in)} "
                f"({router.name} keys: {list(rows)} rows per expert having the module, in expert order)"
            )
        if not bool(torch.isfinite(given).all()):
            raise RouterError(f"prototypes for {m!r} are not finite")
        return given.detach()
    out = A_cat.new_empty(M, n_in)
    if M == 0:
        return out
    groups: dict[int, list[int]] = {}
    for j, r in enumerate(ranks):
        groups.setdefault(r, []).append(j)
    offsets, key_at = [0], [0]
    for r, n in zip(ranks, rows, strict=True):
        offsets.append(offsets[-1] + r)
        key_at.append(key_at[-1] + n)
    for r, members in groups.items():
        if len(groups) == 1:
            A = A_cat.view(E, r, n_in)
            B = Bt_cat.view(E, r, -1).transpose(1, 2)
        else:
            A = torch.stack([A_cat[offsets[j] : offsets[j + 1]] for j in members])
            B = torch.stack([Bt_cat[offsets[j] : offsets[j + 1]].T for j in members])
        scale = torch.tensor([scales[j] for j in members], dtype=A.dtype, device=A.device)
        try:
            vecs = router.keys(A, B, scale)
        except LibstoreError as e:
            raise RouterError(f"computing {router.name} keys of {m!r} failed: {e}") from e
        n = rows[members[0]]
        if tuple(vecs.shape) != (len(members), n, n_in):
            raise RouterError(
                f"{router.name} keys for {m!r} have shape {tuple(vecs.shape)}, "
                f"expected {(len(members), n, n_in)}"
            )
        for i, j in enumerate(members):
            out[key_at[j] : key_at[j + 1]] = vecs[i].to(out.dtype)
    return out
