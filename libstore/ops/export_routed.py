"""``export-routed``: a prompt's per-sequence routed mixture written as one exact PEFT adapter.

Serving engines that load one plain LoRA per request (vLLM, LoRAX, TGI) cannot route per token. With
per-sequence routing each module of a sequence uses one fixed mixture of its experts, which is one
LoRA: A's stacked, B's weighted (:func:`libstore.router.export.mixture_factors`), rank Σ r_j of the
chosen experts (zero-padded to one rank for all modules), ``lora_alpha`` = that rank so that PEFT's
scale is 1. ``PeftModel.from_pretrained(base, DEST)`` then gives the routed model's logits for that
prompt and every continuation of it.

The folder also holds ``libstore_routing.json``: the experts (with sha256), router settings, prompt
and the per-module choice, for provenance (PEFT ignores the file).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libstore.errors import AlreadyExistsError, ValidationError
from libstore.ops import route
from libstore.ops.context import Context
from libstore.ops.experts import get as get_expert
from libstore.ops.experts import get_base
from libstore.ops.query import format_query, parse_query
from libstore.ops.tensors import derived_config, peft_key, read_config
from libstore.store.safetensors_io import save_tensors
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExpertQuery, Mixing, PrototypeMethod, RouterName

PROVENANCE = "libstore_routing.json"


@dataclass(frozen=True)
class RoutedExport:
    """What ``export_routed`` wrote.

    Attributes:
        path: the PEFT adapter folder.
        rank: its LoRA rank (``lora_alpha`` is the same number: scale 1).
        modules: the modules it adapts.
        experts: every expert some module uses, in the router's order.
        routes: module -> [(expert, weight), ...] best first.
    """

    path: Path
    rank: int
    modules: tuple[str, ...]
    experts: tuple[str, ...]
    routes: dict[str, list[tuple[str, float]]]


@dataclass(frozen=True)
class ExportRoutedOptions:
    """The options of ``libstore export-routed`` and ``Library.export_routed``: which experts, how
    they are routed (as ``routed_model``), and whether ``dest`` may be replaced."""

    experts: str | ExpertQuery = "kind=task"
    router: RouterName = "arrow"
    top_k: int = 3
    temperature: float = 1.0
    general: str | ExpertQuery | None = None
    top_n: int = 1
    method: PrototypeMethod = "exact"
    mixing: Mixing = "output"
    overwrite: bool = False
    allow_base_mismatch: bool = False
    seed: int = 0


def export_routed(
    ctx: Context,
    dest: str | os.PathLike[str],
    *,
    prompt: str,
    options: ExportRoutedOptions,
    base: Any = None,
    tokenizer: Any = None,
) -> RoutedExport:
    """Route ``prompt`` once (per-sequence), write the mixture as a PEFT adapter at ``dest``.

    ``base`` is a folder, a Hub id, a loaded model (then ``tokenizer`` is needed) or ``None`` (the
    registered source).

    Raises:
        AlreadyExistsError: ``dest`` exists and is not empty (unless ``overwrite``).
        ValidationError: an empty prompt, or a loaded ``base`` without its ``tokenizer``.
    """
    import torch

    from libstore.router.export import mixture_factors

    o = options
    experts, router, top_k, temperature, general = o.experts, o.router, o.top_k, o.temperature, o.general
    top_n, method, mixing, overwrite = o.top_n, o.method, o.mixing, o.overwrite
    allow_base_mismatch, seed = o.allow_base_mismatch, o.seed

    if not prompt:
        raise ValidationError("the prompt is empty", field="prompt")
    out = Path(dest)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise AlreadyExistsError(f"{out} exists and is not empty; pass overwrite", what="file", name=str(out))
    query = parse_query(experts)
    routed = route.routed_model(
        ctx,
        base=base,
        experts=query,
        router=router,
        top_k=top_k,
        temperature=temperature,
        general=general,
        top_n=top_n,
        method=method,
        mixing=mixing,
        allow_base_mismatch=allow_base_mismatch,
        seed=seed,
    )
    first = get_expert(ctx, routed.experts[0])
    if tokenizer is None:
        if base is not None and not isinstance(base, str | os.PathLike):
            raise ValidationError(
                "a loaded base model needs its tokenizer: pass tokenizer=", field="tokenizer"
            )
        from transformers import AutoTokenizer

        source = str(base) if base else get_base(ctx, first.base_model).source
        tokenizer = AutoTokenizer.from_pretrained(source)
    dev = next(routed.model.parameters()).device
    batch = tokenizer(prompt, return_tensors="pt").to(dev)
    with torch.inference_mode(), routed.sequence_routing() as routes:
        routed.model(input_ids=batch["input_ids"])
    factors = mixture_factors(routed, routes)
    rank = next(iter(factors.values()))[0].shape[0]
    chosen = {name: routes.names(name) for name in factors}
    used = tuple(n for n in routed.experts if any(n == e for c in chosen.values() for e, _ in c))
    template = read_config(ctx, first)
    cfg = derived_config(template, rank=rank, alpha=rank, use_rslora=False, modules=factors)
    cfg["target_modules"] = sorted(factors)  # exactly these modules, whatever the experts targeted
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        cfg[key] = None
    tensors: dict[str, torch.Tensor] = {}
    for m, (a, b) in sorted(factors.items()):
        tensors[peft_key(m, "A")] = a
        tensors[peft_key(m, "B")] = b
    provenance = {
        "format": "libstore-routed/1",
        "router": routed.router,
        "top_k": top_k,
        "temperature": temperature,
        "mixing": mixing,
        "prototype_method": method,
        "seed": seed,
        "general": None if general is None else format_query(parse_query(general)),
        "query": format_query(query),
        "prompt": prompt,
        "experts": {e.name: e.sha256 for e in (get_expert(ctx, n) for n in used)},
        "routes": chosen,
    }
    routed.unpatch()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_tensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return RoutedExport(out, rank, tuple(sorted(factors)), used, chosen)
