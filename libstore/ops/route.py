"""Catalog query in, routed model out: load a base model, check its identity, read each expert blob
once, take the router's keys from the prototype cache (computing only what is missing, on the
router's device, from the weights already in hand; cached once, never read back) and build the router
(Arrow by default)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from libstore.errors import BaseModelMismatchError, RouterError, ValidationError
from libstore.ops import routers
from libstore.ops.context import Context
from libstore.ops.experts import get_base
from libstore.ops.select import Target, resolve_experts
from libstore.ops.tensors import load_expert_tensors
from libstore.types import BaseModel, Expert, ExpertQuery, Granularity, Mixing, PrototypeMethod, RouterName

if TYPE_CHECKING:
    import torch
    from torch import nn

    from libstore.router.model import RoutedModel


def routed_model(
    ctx: Context,
    *,
    base: str | nn.Module | None = None,
    experts: Target = "kind=task",
    top_k: int = 3,
    temperature: float = 1.0,
    general: Target = None,
    method: PrototypeMethod = "exact",
    mixing: Mixing = "output",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_base_mismatch: bool = False,
    router: RouterName = "arrow",
    top_n: int = 1,
    granularity: Granularity = "token",
    seed: int = 0,
    joint_prototypes: bool = False,
) -> RoutedModel:
    """Build a routed model (Arrow by default) over the experts a query selects.

    Args:
        base: a local folder or Hub id (loaded with transformers), a loaded ``PreTrainedModel``
            (patched in place), or ``None`` for the source the experts' base model was registered from.
        experts: a query (``"kind=residual tag=v1"``) or a list of expert names; routing order (and so
            top-k tie-breaking) is the catalog's name order.
        general: GenKnowSub on the fly: subtract the mean of these general experts from each routed
            expert (PEFT's ``use_gks``); prototypes are then computed for the residuals at build time.
        method: ``"exact"`` prototypes (default) or ``"peft"`` (PEFT's power iteration, bit for bit).
        seed: ``method="peft"``: seed of the power iteration's start vector (PEFT's ``rng_seed``).
        mixing: ``"output"`` (PEFT: Σ c_e s_e B_e A_e x) or ``"parameter"`` (mttl: per-token mixed A, B).
        device: where the routed model runs (default: the base model's device); prototypes missing
            from the cache are computed there, from the weights already read for the router.
        router: ``"arrow"``, ``"spectr"`` or ``"uniform"`` (:mod:`libstore.router.routers`);
            ``top_n`` and ``method`` are Arrow's.
        granularity: ``"token"`` or ``"sequence"`` (each sequence routed once, from its prompt).
        joint_prototypes: mttl's Arrow for experts imported with ``tie_params``: the modules whose
            ``lora_a`` mttl tied (q/k/v of a block) share one prototype, the top right singular
            vector of their stacked ΔW ([B_q; B_k; B_v]·A). Warns (``UserWarning``) where that
            changes a prototype, i.e. the routing. Arrow with ``top_n=1`` and no ``general`` only.
    """
    import torch

    from libstore.router.build import ExpertTensors, build_router

    rt = routers.make(router, top_n=top_n, method=method, seed=seed)
    chosen = _select(ctx, experts)
    gen = resolve_experts(ctx, general, what="general expert") if general is not None else []
    base_rec = _common_base(ctx, chosen)
    model = _load_base(base, base_rec, device=device, dtype=dtype)
    _check_identity(model, base_rec, allow_base_mismatch)
    target = torch.device(device if device is not None else _model_device(model))

    ctx.blobs.fetch(e.sha256 for e in [*chosen, *gen])  # a team library downloads them in parallel
    loaded = {e.sha256: load_expert_tensors(ctx, e) for e in chosen}  # each blob read once
    tensors = [ExpertTensors(e.name, e.scale, loaded[e.sha256]) for e in chosen]
    general_tensors = [ExpertTensors(g.name, g.scale, load_expert_tensors(ctx, g)) for g in gen]
    prototypes = None
    if not gen:  # with GenKnowSub the router computes the residuals' keys itself
        prototypes = routers.cached_keys(ctx, chosen, rt, str(target), loaded)
    if joint_prototypes:
        if gen or router != "arrow" or top_n != 1 or prototypes is None:
            raise ValidationError(
                "joint_prototypes is mttl's Arrow: use router 'arrow' with top_n=1 and no general experts",
                field="joint_prototypes",
            )
        prototypes = _joint_prototypes(chosen, loaded, prototypes)
    return build_router(
        model,
        tensors,
        general=general_tensors,
        router=rt,
        prototypes=prototypes,
        top_k=top_k,
        temperature=temperature,
        mixing=mixing,
        granularity=granularity,
        device=target,
    )


#: |cos| below which a joint prototype counts as a change of the per-module one
_SAME_DIRECTION = 1 - 1e-4


def _joint_prototypes(
    chosen: list[Expert], loaded: dict[str, Any], keys: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``keys`` with each ``tie_params`` group of an mttl expert given its joint prototype (mttl's
    ArrowTransform, ``tie_op="concat"``); warns where one changes."""
    import warnings

    import torch

    from libstore.hub.mttl import tie_groups
    from libstore.lowrank.prototypes import exact_prototypes

    out = {m: k.clone() for m, k in keys.items()}
    changed: list[str] = []
    for e in chosen:
        tie = (e.metadata.get("mttl") or {}).get("tie_params")
        if not isinstance(tie, str):
            continue
        factors = loaded[e.sha256]
        for group in tie_groups(tie, list(factors), where=f"expert {e.name!r}"):
            A = factors[group[0]][0]
            if any(not torch.equal(factors[m][0], A) for m in group):
                raise ValidationError(
                    f"expert {e.name!r}: tie_params ties lora_a of {group} but they differ; its "
                    f"weights are not those mttl trained with tie_params",
                    field="joint_prototypes",
                )
            B = torch.cat([factors[m][1] for m in group], dim=0)
            joint = exact_prototypes(A.double(), B.double()).vectors[0]
            for m in group:
                row = [x.name for x in chosen if m in loaded[x.sha256]].index(e.name)
                before = out[m][row].double()
                if float(torch.nn.functional.cosine_similarity(before, joint, dim=0).abs()) < _SAME_DIRECTION:
                    changed.append(f"{e.name}:{m}")
                out[m][row] = joint.to(out[m].dtype)
    if changed:
        warnings.warn(
            f"joint prototypes (mttl's tie_params) change the routing of {len(changed)} expert-modules, "
            f"e.g. {', '.join(changed[:3])}: they differ from the per-module prototypes",
            UserWarning,
            stacklevel=3,
        )
    return out


def _select(ctx: Context, experts: Target) -> list[Expert]:
    """The routed experts in name order (a list of names too: routing order is the catalog's)."""
    chosen = resolve_experts(ctx, experts)
    return (
        chosen
        if experts is None or isinstance(experts, str | ExpertQuery)
        else sorted(chosen, key=lambda e: e.name)
    )


def _common_base(ctx: Context, chosen: list[Expert]) -> BaseModel:
    names = sorted({e.base_model for e in chosen})
    if len(names) != 1:
        raise BaseModelMismatchError(
            f"the selected experts belong to different base models ({', '.join(names)}); "
            f"narrow the query, e.g. add base={names[0]}"
        )
    return get_base(ctx, names[0])


def _load_base(base: Any, rec: BaseModel, *, device: Any, dtype: Any) -> nn.Module:
    """The caller's model, or one loaded from safetensors weights only (never a pickle, never code);
    never from a source a remote named unless the caller names it (``base``)."""
    from torch import nn

    if isinstance(base, nn.Module):
        return base
    from transformers import AutoModelForCausalLM

    if base is None and rec.origin is not None:
        raise RouterError(
            f"base model {rec.name!r} was registered by a pull ({rec.origin}), so its source "
            f"{rec.source!r} was named by the remote; libstore does not load weights from there unless "
            f"you say so. Pass the model yourself: --base {rec.source} if you trust it, or --base with a "
            f"local folder of the same model (in Python: routed_model(base=...))"
        )
    source = rec.source if base is None else str(base)
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": False}
    if base is None and rec.revision:
        kwargs["revision"] = rec.revision
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise RouterError(
            f"cannot load base model {source!r} from safetensors weights: {e}. libstore never loads "
            f"pickled weights (pytorch_model.bin); convert the model with "
            f"save_pretrained(..., safe_serialization=True) in a trusted environment"
        ) from e
    if device is not None:
        model = model.to(device)
    model.train(False)  # eval mode (``eval()`` is untyped in transformers)
    return model


def _check_identity(model: nn.Module, rec: BaseModel, allow: bool) -> None:
    from libstore.store.basemodel import fingerprint_config

    config = getattr(model, "config", None)
    if config is None:
        raise RouterError("the base model has no transformers config; pass a PreTrainedModel")
    if fingerprint_config(config) != rec.fingerprint and not allow:
        raise BaseModelMismatchError(
            f"this base model's config does not match base model {rec.name!r} of the experts "
            f"(registered from {rec.source}); load the right model, or pass "
            f"allow_base_mismatch=True if you are sure (shapes are still checked)"
        )


def _model_device(model: nn.Module) -> str:
    for p in model.parameters():
        return str(p.device)
    return "cpu"
