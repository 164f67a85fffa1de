"""Expert tensors in and out of the store: the one loader and the one writer of derived experts.

``load_expert_tensors`` reads an expert's ``adapter_model.safetensors`` blob once and returns
``module -> (A, B)`` with A ``(r, in)`` and B ``(out, r)``, keyed by base-model module names
(``model.layers.0.self_attn.q_proj``). The blob's hash is trusted (it was checked when stored;
``libstore verify`` re-checks), its header is validated on every load.

``stage_expert`` turns computed factors into a PEFT folder's two files in the blob store (the config
derived from a parent's ``adapter_config.json``), validated by the same reader ``libstore add`` uses;
:meth:`StagedExpert.expert` is the catalog record to write for it. So a derived expert is an ordinary
expert: exported, pushed and loaded with ``PeftModel.from_pretrained`` like any other.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from libstore.errors import (
    BaseModelMismatchError,
    IncompatibleExpertsError,
    ValidationError,
)
from libstore.ops.context import Context
from libstore.ops.experts import expert_record
from libstore.store.adapter import KEY_PREFIX
from libstore.store.derived import store_derived
from libstore.store.safetensors_io import load_tensors
from libstore.store.targeting import untargeted
from libstore.types import (
    ADAPTER_CONFIG,
    AdapterFile,
    Expert,
    ExpertKind,
    StoredFile,
)

if TYPE_CHECKING:
    import torch

ModuleFactors = dict[str, tuple["torch.Tensor", "torch.Tensor"]]


def default_device(device: str | None = None) -> str:
    """``device`` if given, else ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peft_key(module: str, part: str) -> str:
    """The key PEFT's ``save_pretrained`` writes for a module's ``lora_A`` / ``lora_B`` weight."""
    return f"{KEY_PREFIX}{module}.lora_{part}.weight"


def load_expert_tensors(
    ctx: Context,
    expert: Expert,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    modules: Iterable[str] | None = None,
) -> ModuleFactors:
    """``module -> (A, B)`` of one expert, read from its weights blob in one pass.

    Args:
        expert: the catalog record (its ``sha256`` names the blob).
        device: where the tensors should live (``"cuda"`` for GPU work).
        dtype: convert to this dtype (e.g. ``torch.float32`` for math); ``None`` keeps the stored one.
        modules: only these modules (default: all of the expert's modules).
    """
    wanted = sorted(expert.modules) if modules is None else list(modules)
    names = [k for m in wanted for k in (peft_key(m, "A"), peft_key(m, "B"))]
    tensors = load_tensors(ctx.blobs.path(expert.sha256), names)
    out: ModuleFactors = {}
    for m in wanted:
        a, b = tensors.pop(peft_key(m, "A")), tensors.pop(peft_key(m, "B"))
        out[m] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
    return out


# --- writing derived experts -------------------------------------------------------------------


@dataclass(frozen=True)
class StagedExpert:
    """A derived expert's files, already in the blob store and validated, not yet in the catalog."""

    adapter: AdapterFile
    files: tuple[StoredFile, ...]

    @property
    def sha256(self) -> str:
        return self.adapter.weights_sha256

    def expert(
        self,
        *,
        name: str,
        kind: ExpertKind,
        base_model: str,
        tasks: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
        source: str | None = None,
    ) -> Expert:
        """The catalog record of these files as expert ``name`` (:func:`ops.experts.expert_record`)."""
        return expert_record(
            self.adapter,
            self.files,
            name=name,
            kind=kind,
            base_model=base_model,
            source=source,
            tasks=tasks,
            metadata=metadata,
        )


def read_config(ctx: Context, expert: Expert) -> dict[str, Any]:
    """An expert's ``adapter_config.json`` from the store."""
    data: dict[str, Any] = json.loads(ctx.blobs.read_bytes(expert.file(ADAPTER_CONFIG).sha256))
    return data


def derived_config(
    template: Mapping[str, Any],
    *,
    rank: int,
    alpha: float,
    use_rslora: bool,
    modules: Iterable[str],
) -> dict[str, Any]:
    """A parent's config with r / lora_alpha / use_rslora set and target_modules covering ``modules``.

    The parent's targeting (target_modules, layers_to_transform, ...) is kept when it targets exactly
    these modules' kinds; otherwise target_modules becomes the list of module-name suffixes.
    """
    cfg = dict(template)
    cfg.update(
        r=int(rank),
        lora_alpha=int(alpha) if float(alpha).is_integer() else float(alpha),
        use_rslora=bool(use_rslora),
        rank_pattern={},
        alpha_pattern={},
    )
    modules = sorted(modules)
    if untargeted(cfg, modules, where="the parent's adapter_config.json"):
        cfg["target_modules"] = sorted({m.rsplit(".", 1)[-1] for m in modules})
        for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
            cfg[key] = None
    return cfg


def _pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int, module: str) -> tuple[torch.Tensor, ...]:
    """Zero-pad factors of rank r <= ``rank`` to ``rank`` (same ΔW; PEFT needs one rank)."""
    import torch

    r = a.shape[0]
    if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r:
        raise ValidationError(
            f"module {module!r}: A {list(a.shape)} and B {list(b.shape)} are not LoRA factors "
            f"(A (r, in), B (out, r))"
        )
    if r > rank:
        raise ValidationError(f"module {module!r} has rank {r}, more than the expert's rank {rank}")
    if r == rank:
        return a, b
    a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
    b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
    return a, b


def stage_expert(
    ctx: Context,
    *,
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    rank: int,
    alpha: float,
    use_rslora: bool,
    template_config: Mapping[str, Any],
    dtype: str | torch.dtype = "float32",
    metadata: Mapping[str, str] | None = None,
) -> StagedExpert:
    """Write a PEFT folder's two files for ``modules`` into the blob store, validated.

    Modules of lower rank than ``rank`` are zero-padded (PEFT loads one rank for all modules).
    ``dtype`` is the stored weight dtype.
    """
    import torch

    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    tensors: dict[str, torch.Tensor] = {}
    for m in sorted(modules):
        a, b = _pad_rank(*modules[m], rank, m)
        tensors[peft_key(m, "A")] = a.detach().to("cpu", torch_dtype).contiguous()
        tensors[peft_key(m, "B")] = b.detach().to("cpu", torch_dtype).contiguous()
    cfg = derived_config(template_config, rank=rank, alpha=alpha, use_rslora=use_rslora, modules=modules)
    adapter, files = store_derived(ctx.blobs, ctx.path, cfg, tensors, metadata or {"format": "pt"})
    return StagedExpert(adapter=adapter, files=files)


# --- compatibility -----------------------------------------------------------------------------


def check_compatible(
    experts: Sequence[Expert], *, operation: str, same_rank: bool = False, rank_hint: str = ""
) -> None:
    """Experts that one operation combines must share base model and LoRA modules (and shapes).

    Raises :class:`BaseModelMismatchError` or :class:`IncompatibleExpertsError` naming the first pair
    at fault and what to do. ``same_rank`` also requires equal ranks (``rank_hint`` says the way out).
    """
    if not experts:
        raise ValidationError(f"{operation}: no experts given")
    first = experts[0]
    for e in experts[1:]:
        if e.base_model != first.base_model:
            raise BaseModelMismatchError(
                f"{operation}: {first.name!r} belongs to base model {first.base_model!r} but "
                f"{e.name!r} to {e.base_model!r}; experts of different base models cannot be "
                f"combined — narrow the query, e.g. 'base={first.base_model}'"
            )
        if set(e.modules) != set(first.modules):
            only_first = sorted(set(first.modules) - set(e.modules))
            only_e = sorted(set(e.modules) - set(first.modules))
            diff = (
                f"{first.name!r} has {only_first[0]!r} which {e.name!r} lacks"
                if only_first
                else f"{e.name!r} has {only_e[0]!r} which {first.name!r} lacks"
            )
            raise IncompatibleExpertsError(
                f"{operation}: {first.name!r} and {e.name!r} adapt different modules "
                f"(target_modules {list(first.target_modules)} vs {list(e.target_modules)}; {diff}); "
                f"only experts with the same LoRA modules can be combined"
            )
        for m, sh in e.modules.items():
            f = first.modules[m]
            if (sh.in_features, sh.out_features) != (f.in_features, f.out_features):
                raise IncompatibleExpertsError(
                    f"{operation}: module {m!r} is {f.out_features}x{f.in_features} in "
                    f"{first.name!r} but {sh.out_features}x{sh.in_features} in {e.name!r}"
                )
        if same_rank and e.rank != first.rank:
            raise IncompatibleExpertsError(
                f"{operation}: {first.name!r} has rank {first.rank} but {e.name!r} rank {e.rank}; "
                f"this needs equal ranks{rank_hint}"
            )
