"""The router against its oracle, ``peft.create_arrow_model`` (PEFT 0.21), on tiny Llama and Phi-3 models.

With PEFT's prototypes (``peft_prototype_fn(seed=...)``, bit-identical to PEFT's power iteration) the
logits match PEFT to fp32 accuracy for top_k 1, 2 and E, temperatures 1 and 0.5, with and without
GenKnowSub, with every execution strategy; experts targeting different layers match too. With exact
prototypes the router matches PEFT wherever PEFT's power iteration converged (adapters with one
dominant singular direction): the same experts per token and close logits.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from libstore.router.build import (
    ExpertTensors,
    build_router,
    exact_prototype_fn,
    peft_prototype_fn,
)
from libstore.router.model import RoutedModel
from tests.router_support import (  # noqa: F401 - one_torch_thread is an autouse fixture
    LLAMA_MODULES,
    PHI3_MODULES,
    dominant,
    load_peft_folder,
    make_adapter,
    one_torch_thread,
    peft_arrow,
    tiny_llama,
    tiny_phi3,
)

E = 4
SEED = 7
ATOL = 1e-5


class Library:
    """A tiny base model with E task adapters and 2 general adapters saved as PEFT folders."""

    def __init__(self, base: nn.Module, root: Path, modules: list[str]) -> None:
        self.base = base
        self.tasks = [make_adapter(base, root / f"task{i}", seed=i, target_modules=modules) for i in range(E)]
        self.general = [
            make_adapter(base, root / f"general{i}", seed=100 + i, target_modules=modules) for i in range(2)
        ]
        self.task_tensors = [load_peft_folder(p) for p in self.tasks]
        self.general_tensors = [load_peft_folder(p) for p in self.general]
        self.ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=["llama", "phi3"])
def lib(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Library:
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        return Library(tiny_llama(), root, LLAMA_MODULES)
    return Library(tiny_phi3(), root, PHI3_MODULES)


def ours(base: nn.Module, tasks: list[ExpertTensors], **kw: Any) -> RoutedModel:
    kw.setdefault("prototype_fn", peft_prototype_fn(seed=SEED))
    return build_router(copy.deepcopy(base), tasks, **kw)


def arrow_layers(peft_model: nn.Module) -> dict[str, nn.Module]:
    """module name (as in the base model) -> PEFT's ArrowLoraLinearLayer."""
    out = {}
    for name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_arrow") and "arrow_router" in mod.lora_arrow:
            out[name.removeprefix("base_model.model.")] = mod.lora_arrow["arrow_router"]
    return out


@torch.no_grad()
@pytest.mark.parametrize("gks", [False, True], ids=["plain", "genknowsub"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
@pytest.mark.parametrize("top_k", [1, 2, E])
def test_logits_match_peft(lib: Library, top_k: int, temperature: float, gks: bool) -> None:
    general = lib.general if gks else []
    pm = peft_arrow(
        lib.base,
        lib.tasks,
        top_k=top_k,
        temperature=temperature,
        general=general,
        seed=SEED,
    )
    expected = pm(lib.ids).logits
    rm = ours(
        lib.base,
        lib.task_tensors,
        general=lib.general_tensors if gks else (),
        top_k=top_k,
        temperature=temperature,
    )
    # prototypes are PEFT's, bit for bit (after GenKnowSub when enabled)
    peft_layers = arrow_layers(pm)
    assert set(peft_layers) == set(rm.layers)
    for name, layer in rm.layers.items():
        assert torch.equal(layer.prototypes, peft_layers[name].prototypes), name
    for strategy in ("dense", "gather", "grouped"):
        rm.configure(strategy=strategy)
        got = rm(lib.ids).logits
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=lambda m, s=strategy: f"{s}: {m}")


@torch.no_grad()
def test_experts_on_different_layers_match_peft(tmp_path: Path) -> None:
    """Each module routes over the experts that have it (PEFT: layers_to_transform per adapter)."""
    base = tiny_llama()
    layers = [[0, 1], [0], [1], [0, 1], [1]]
    tasks = [
        make_adapter(
            base,
            tmp_path / f"t{i}",
            seed=20 + i,
            target_modules=["q_proj", "v_proj"],
            layers=ls,
        )
        for i, ls in enumerate(layers)
    ]
    general = [
        make_adapter(base, tmp_path / f"g{i}", seed=30 + i, target_modules=["q_proj", "v_proj"])
        for i in range(2)
    ]
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    for top_k, gks in ((2, False), (3, False), (2, True)):
        pm = peft_arrow(base, tasks, top_k=top_k, seed=SEED, general=general if gks else ())
        expected = pm(ids).logits
        rm = ours(
            base,
            [load_peft_folder(p) for p in tasks],
            top_k=top_k,
            general=[load_peft_folder(p) for p in general] if gks else (),
        )
        assert rm.layers["model.layers.0.self_attn.q_proj"].expert_ids.tolist() == [
            0,
            1,
            3,
        ]
        assert rm.layers["model.layers.1.self_attn.v_proj"].expert_ids.tolist() == [
            0,
            2,
            3,
            4,
        ]
        for strategy in ("dense", "gather", "grouped"):
            rm.configure(strategy=strategy)
            torch.testing.assert_close(rm(ids).logits, expected, atol=ATOL, rtol=0)


def _peft_choices(pm: nn.Module, ids: Tensor) -> dict[str, Tensor]:
    """PEFT's top-k expert sets per module and token, from its own prototypes and layer inputs."""
    layers = arrow_layers(pm)
    seen: dict[str, Tensor] = {}
    hooks = []
    for name, mod in pm.named_modules():
        key = name.removeprefix("base_model.model.")
        if key in layers:

            def hook(_m: nn.Module, args: tuple[Tensor, ...], key: str = key) -> None:
                h = args[0].reshape(-1, args[0].shape[-1]).float()
                arrow = layers[key]
                seen[key] = (
                    torch.topk((h @ arrow.prototypes.T).abs(), arrow.top_k, dim=1).indices.sort(1).values
                )

            hooks.append(mod.register_forward_pre_hook(hook))
    pm(ids)
    for h in hooks:
        h.remove()
    return seen


@torch.no_grad()
@pytest.mark.parametrize("make_base,modules", [(tiny_llama, LLAMA_MODULES), (tiny_phi3, PHI3_MODULES)])
def test_exact_prototypes_match_peft_where_power_iteration_converged(
    tmp_path: Path, make_base: Any, modules: list[str]
) -> None:
    base = make_base()
    tasks = [
        make_adapter(
            base,
            tmp_path / f"t{i}",
            seed=40 + i,
            target_modules=modules,
            edit=dominant(10.0),
        )
        for i in range(5)
    ]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    pm = peft_arrow(base, tasks, top_k=2, seed=SEED)
    expected = pm(ids).logits
    rm = ours(
        base,
        [load_peft_folder(p) for p in tasks],
        top_k=2,
        prototype_fn=exact_prototype_fn,
    )
    peft_layers = arrow_layers(pm)
    for name, layer in rm.layers.items():  # same vectors up to sign
        cos = (layer.prototypes * peft_layers[name].prototypes).sum(1).abs()
        assert cos.min() > 1 - 1e-6, name
    with rm.explain() as trace:
        got = rm(ids).logits
    choices = _peft_choices(pm, ids)
    for name in rm.layers:
        mine, _ = trace.tokens(name)
        assert torch.equal(mine.sort(1).values, choices[name]), name
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_bf16_close_to_peft(tmp_path: Path) -> None:
    """bf16 base: both score and mix in fp32 (PEFT upcasts adapters), base matmuls in bf16."""
    base = tiny_llama()
    tasks = [
        make_adapter(base, tmp_path / f"t{i}", seed=60 + i, target_modules=LLAMA_MODULES) for i in range(4)
    ]
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    base16 = copy.deepcopy(base).to(torch.bfloat16)
    pm = peft_arrow(base16, tasks, top_k=2, seed=SEED)
    expected = pm(ids).logits
    rm = ours(base16, [load_peft_folder(p) for p in tasks], top_k=2)
    layer = next(iter(rm.layers.values()))
    assert layer.lora_A.dtype == torch.float32 and layer.prototypes.dtype == torch.float32
    got = rm(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=0.05, rtol=0.02)
