"""Helpers for the router tests: tiny base models, real PEFT adapter folders, the PEFT Arrow oracle.

Adapters are made the way users make them (``get_peft_model`` + ``save_pretrained``) so the oracle
(``peft.create_arrow_model``) reads PEFT's own files; ``load_peft_folder`` (from
``benchmarks/peft_reference.py``, its one home) reads the same files into
:class:`~libstore.router.build.ExpertTensors` (the library's loader reads the content-addressed store
instead). ``tests/test_router_support_checks.py`` checks the helpers themselves.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from benchmarks.peft_reference import load_peft_folder as load_peft_folder  # its one home
from libstore.router.build import ExpertTensors


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine every parallel
    region can wait a scheduler quantum for its second thread: run the router tests on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LLAMA_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
]
PHI3_MODULES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_phi3(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = Phi3Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Phi3ForCausalLM(cfg).eval()


def linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}


def random_experts(
    model: nn.Module,
    n: int,
    *,
    ranks: Sequence[int] = (4,),
    subsets: bool = False,
    seed: int = 0,
    scale: float = 0.2,
) -> list[ExpertTensors]:
    """n experts with random factors; rank cycles through ``ranks``; with ``subsets`` each expert
    targets a different selection of modules (every module keeps at least one expert)."""
    gen = torch.Generator().manual_seed(seed)
    lins = linears(model)
    names = list(lins)
    out = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        chosen = [m for j, m in enumerate(names) if not subsets or i == 0 or (i + j) % 3 != 0]
        mods = {
            m: (
                torch.randn(r, lins[m].in_features, generator=gen) * scale,
                torch.randn(lins[m].out_features, r, generator=gen) * scale,
            )
            for m in chosen
        }
        out.append(ExpertTensors(f"expert{i}", 8.0 / r, mods))
    return out


def make_adapter(
    base: nn.Module,
    folder: Path,
    *,
    seed: int,
    target_modules: Sequence[str],
    r: int = 4,
    alpha: float = 8,
    layers: Sequence[int] | None = None,
    edit: Callable[[str, Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]] | None = None,
) -> Path:
    """Save a PEFT LoRA adapter of ``base`` (random A and B, seeded) to ``folder``; returns it.

    ``edit(module, A, B, gen) -> (A, B)`` may replace each module's factors (e.g. to plant a spectral gap).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        init_lora_weights=False,
        layers_to_transform=list(layers) if layers is not None else None,
    )
    pm = get_peft_model(copy.deepcopy(base), cfg)
    if edit is not None:
        gen = torch.Generator().manual_seed(seed + 10_000)
        with torch.no_grad():
            for name, mod in pm.named_modules():
                if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                    A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
                    A2, B2 = edit(name, A.clone(), B.clone(), gen)
                    A.copy_(A2)
                    B.copy_(B2)
    pm.save_pretrained(str(folder))
    return folder


def dominant(
    scale: float = 10.0,
) -> Callable[[str, Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]]:
    """An ``edit`` giving ΔW one dominant direction: σ1/σ2 ≈ scale² (power iteration converges)."""

    def edit(_name: str, A: Tensor, B: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        A = torch.randn(A.shape, generator=gen) * 0.05
        B = torch.randn(B.shape, generator=gen) * 0.05
        A[0] = torch.randn(A.shape[1], generator=gen) * 0.05 * scale
        B[:, 0] = torch.randn(B.shape[0], generator=gen) * 0.05 * scale
        return A, B

    return edit


def peft_arrow(
    base: nn.Module,
    tasks: Sequence[Path],
    *,
    top_k: int,
    temperature: float = 1.0,
    general: Sequence[Path] = (),
    seed: int = 0,
) -> nn.Module:
    """The oracle: ``peft.create_arrow_model`` on a copy of ``base``."""
    from peft import ArrowConfig, create_arrow_model

    cfg = ArrowConfig(
        top_k=top_k,
        router_temperature=temperature,
        use_gks=bool(general),
        rng_seed=seed,
    )
    model = create_arrow_model(
        copy.deepcopy(base),
        task_specific_adapter_paths=[str(p) for p in tasks],
        general_adapter_paths=[str(p) for p in general] or None,
        arrow_config=cfg,
    )
    return model.eval()


class ShapeRecorder(TorchDispatchMode):
    """Records the numel of every tensor any torch op returns (to prove what is never materialised)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            a.untyped_storage().data_ptr()
            for a in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(a, torch.Tensor)
        }
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # views and in-place results share an input's storage: they allocate nothing
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.shapes.append(tuple(t.shape))
                self.largest = max(self.largest, t.numel())
        return out


@contextmanager
def recording_shapes() -> Iterator[ShapeRecorder]:
    rec = ShapeRecorder()
    with rec:
        yield rec
