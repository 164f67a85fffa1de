"""The PEFT side of the router benchmark, and the benchmark's model and adapters.

Kept apart from ``benchmarks/router.py`` so that the comparison (PEFT 0.21's ``create_arrow_model``, a
single unmerged LoRA) is easy to read on its own. libstore's router never imports PEFT; only this file
and the tests do.

- :func:`bench_model`: the DESIGN.md reference model (Llama-style, hidden 512, 4 layers, intermediate
  1376, vocab 1000), seeded.
- :func:`write_adapters`: E rank-8 adapters on all 7 Linear modules of every layer, written as PEFT
  folders. The first is made by PEFT itself (``get_peft_model`` + ``save_pretrained``); the others reuse
  its ``adapter_config.json`` and key names with fresh Gaussian factors, which is the same file format
  at a fraction of the cost (no model copy per adapter).
- :func:`load_peft_folder`: one folder -> ``ExpertTensors`` (benchmarks and tests; the library reads
  the content-addressed store).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from libstore.router.build import ExpertTensors

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_model(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=1000,
        max_position_embeddings=1024,
    )
    return LlamaForCausalLM(cfg).eval()


def write_adapters(base: nn.Module, root: Path, n: int, *, r: int = 8, alpha: float = 16) -> list[Path]:
    """``n`` PEFT adapter folders under ``root`` (reused if already there); returns their paths."""
    from peft import LoraConfig, get_peft_model

    root.mkdir(parents=True, exist_ok=True)
    first = root / "expert_0000"
    if not (first / "adapter_model.safetensors").exists():
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=MODULES, init_lora_weights=False)
        pm = get_peft_model(copy.deepcopy(base), cfg)
        pm.save_pretrained(str(first))
    template = load_file(str(first / "adapter_model.safetensors"))
    paths = [first]
    gen = torch.Generator().manual_seed(1234)
    for i in range(1, n):
        folder = root / f"expert_{i:04d}"
        paths.append(folder)
        if (folder / "adapter_model.safetensors").exists():
            continue
        folder.mkdir(exist_ok=True)
        shutil.copy(first / "adapter_config.json", folder / "adapter_config.json")
        tensors = {}
        for key, t in template.items():
            fan = t.shape[1]
            tensors[key] = (torch.randn(t.shape, generator=gen) / fan**0.5).contiguous()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return paths


def load_peft_folder(path: str | Path, name: str | None = None) -> ExpertTensors:
    """Read a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) into
    ``ExpertTensors``; module names as in the base model. The one copy (tests import it from here)."""
    path = Path(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
    tensors = load_file(str(path / "adapter_model.safetensors"))
    modules: dict[str, tuple[Tensor, Tensor]] = {}
    for key, A in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            modules[module] = (A, tensors[key.replace(".lora_A.", ".lora_B.")])
    return ExpertTensors(name or path.name, scale, modules)


def peft_arrow(base: nn.Module, paths: list[Path], *, top_k: int = 3, seed: int = 0) -> nn.Module:
    """``peft.create_arrow_model`` over ``paths`` (patches ``base`` in place, as PEFT does)."""
    from peft import ArrowConfig, create_arrow_model

    cfg = ArrowConfig(top_k=top_k, rng_seed=seed)
    return create_arrow_model(
        base, task_specific_adapter_paths=[str(p) for p in paths], arrow_config=cfg
    ).eval()


def peft_single_lora(base: nn.Module, path: Path) -> nn.Module:
    """Base + one LoRA, unmerged (``PeftModel.from_pretrained``)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path)).eval()
