"""Catalog query in, routed model out: load a base model, check its identity, read each expert blob
once, take prototypes from the cache (computing only what is missing) and build the Arrow router."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from libstore.errors import BaseModelMismatchError, NotFoundError, RouterError
from libstore.ops import prototypes as protos
from libstore.ops.context import Context
from libstore.ops.experts import experts as find_experts
from libstore.ops.experts import get_base
from libstore.ops.query import parse_query
from libstore.types import BaseModel, Expert, ExpertQuery

if TYPE_CHECKING:
    import torch
    from torch import nn

    from libstore.router.model import RoutedModel


def routed_model(
    ctx: Context,
    *,
    base: str | nn.Module | None = None,
    experts: str | ExpertQuery | Sequence[str] = "kind=task",
    top_k: int = 3,
    temperature: float = 1.0,
    general: str | ExpertQuery | None = None,
    method: str = "exact",
    mixing: str = "output",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    allow_base_mismatch: bool = False,
) -> RoutedModel:
    """Build an Arrow-routed model over the experts a query selects.

    Args:
        base: a local folder or Hub id (loaded with transformers), a loaded ``PreTrainedModel``
            (patched in place), or ``None`` for the source the experts' base model was registered from.
        experts: a query (``"kind=residual tag=v1"``) or a list of expert names; routing order (and so
            top-k tie-breaking) is the catalog's name order.
        general: GenKnowSub on the fly: subtract the mean of these general experts from each routed
            expert (PEFT's ``use_gks``); prototypes are then computed for the residuals at build time.
        method: ``"exact"`` prototypes (default) or ``"peft"`` (PEFT's power iteration, bit for bit).
        mixing: ``"output"`` (PEFT: Σ c_e s_e B_e A_e x) or ``"parameter"`` (mttl: per-token mixed A, B).
    """
    import torch

    from libstore.router.build import (
        ExpertTensors,
        build_router,
        exact_prototype_fn,
        peft_prototype_fn,
    )

    chosen = _select(ctx, experts)
    base_rec = _common_base(ctx, chosen, general)
    model = _load_base(base, base_rec, device=device, dtype=dtype)
    _check_identity(model, base_rec, allow_base_mismatch)
    target_device = device if device is not None else _model_device(model)

    loaded = {e.sha256: _factors(ctx, e) for e in chosen}
    tensors = [ExpertTensors(e.name, e.scale, loaded[e.sha256]) for e in chosen]
    general_tensors: list[Any] = []
    prototypes = None
    if general is not None:
        gen = find_experts(ctx, general)
        if not gen:
            raise NotFoundError(f"no general expert matches {general!r}")
        general_tensors = [ExpertTensors(g.name, g.scale, _factors(ctx, g)) for g in gen]
    else:
        prototypes = _cached_prototypes(ctx, chosen, loaded, method)
    return build_router(
        model,
        tensors,
        general=general_tensors,
        prototypes=prototypes,
        prototype_fn=peft_prototype_fn() if method == "peft" else exact_prototype_fn,
        top_k=top_k,
        temperature=temperature,
        mixing=mixing,  # type: ignore[arg-type]
        device=torch.device(target_device),
    )


def _select(ctx: Context, experts: str | ExpertQuery | Sequence[str]) -> list[Expert]:
    if isinstance(experts, str | ExpertQuery):
        chosen = find_experts(ctx, parse_query(experts))
    else:
        chosen = find_experts(ctx, " ".join(f"name={n}" for n in experts)) if experts else []
        missing = sorted(set(experts) - {e.name for e in chosen})
        if missing:
            raise NotFoundError(f"no expert named {missing[0]!r}; list them with: libstore ls")
    if not chosen:
        raise NotFoundError(f"no expert matches {experts!r}; list them with: libstore ls")
    return chosen


def _common_base(ctx: Context, chosen: list[Expert], general: Any) -> BaseModel:
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
    model.train(False)
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


def _factors(ctx: Context, expert: Expert) -> Any:
    from libstore.ops.tensors import load_expert_tensors

    return load_expert_tensors(ctx, expert)


def _cached_prototypes(
    ctx: Context, chosen: list[Expert], loaded: dict[str, Any], method: str
) -> dict[str, torch.Tensor]:
    """module -> (E_m, in) cached prototypes; missing ones computed from the tensors in memory."""
    import torch

    spec = protos.method_spec(method)
    protos.ensure(
        ctx, chosen, spec, protos.default_device(None), protos.DEFAULT_BATCH_BYTES, preloaded=loaded
    )
    stacked = protos.stacked(ctx, chosen, method=method)
    return {m: v[:, 0, :].to(torch.float32) for m, v in stacked.items()}
