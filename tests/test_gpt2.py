"""GPT-2 style models (transformers ``Conv1D`` layers, weight (in, out)) end to end, PEFT as the oracle.

PEFT's own Arrow tests put LoRA on a tiny GPT-2's ``c_attn``; here the same adapters are registered,
added, given prototypes, routed (with and without GenKnowSub), exported and exported as a routed
mixture, and each result is compared with what PEFT computes from the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from libstore import Library
from libstore.errors import BaseModelMismatchError, RouterError
from libstore.router.build import ExpertTensors, build_router
from tests.factories import GPT2_TARGETS, load_base, make_adapter, make_base_model
from tests.test_ops_routers import save_tokenizer

SEED = 0


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = make_base_model(tmp_path_factory.mktemp("gpt2"), arch="gpt2")
    save_tokenizer(base)
    return base


@pytest.fixture
def gpt2_lib(tmp_path: Path, db_url: str | None, gpt2_dir: Path) -> Library:
    lib = Library.init(tmp_path / "lib", db_url=db_url)
    lib.add_base("gpt2", str(gpt2_dir))
    for i in range(4):  # PEFT's Arrow needs every task adapter on the same modules
        lib.add(
            make_adapter(gpt2_dir, tmp_path / "src" / f"task{i}", seed=i, targets=GPT2_TARGETS),
            name=f"task{i}",
        )
    for i in range(2):
        folder = make_adapter(gpt2_dir, tmp_path / "src" / f"gen{i}", seed=50 + i, targets=GPT2_TARGETS)
        lib.add(folder, name=f"gen{i}", kind="general")
    return lib


def _peft_arrow(lib: Library, gpt2_dir: Path, tmp: Path, *, top_k: int, gks: bool, seed: int) -> nn.Module:
    from peft import ArrowConfig, create_arrow_model

    def out(kind: str) -> list[str]:
        return [str(lib.export(e.name, tmp / "peft" / e.name)) for e in lib.experts(f"kind={kind}")]

    cfg = ArrowConfig(top_k=top_k, router_temperature=1.0, use_gks=gks, rng_seed=seed)
    model = create_arrow_model(
        load_base(gpt2_dir),
        task_specific_adapter_paths=out("task"),
        general_adapter_paths=out("general") if gks else None,
        arrow_config=cfg,
    )
    return model.eval()


def test_register_records_conv1d_layers_as_in_out(gpt2_lib: Library) -> None:
    base = gpt2_lib.base("gpt2")
    shapes = {m: (s.in_features, s.out_features) for m, s in base.linear_shapes.items()}
    assert shapes["transformer.h.0.attn.c_attn"] == (32, 96)  # Conv1D weight is (in, out) = (32, 96)
    assert shapes["transformer.h.1.mlp.c_fc"] == (32, 128)
    assert shapes["transformer.h.1.mlp.c_proj"] == (128, 32)
    assert shapes["lm_head"] == (32, 128)
    task0 = gpt2_lib.get("task0")
    assert task0.target_modules == ("c_attn", "c_fc", "c_proj") and task0.base_model == "gpt2"


@pytest.mark.parametrize(("top_k", "gks", "seed"), [(1, False, 0), (2, True, 42), (4, False, 42)])
def test_routed_gpt2_matches_peft_arrow(
    gpt2_lib: Library, gpt2_dir: Path, tmp_path: Path, top_k: int, gks: bool, seed: int
) -> None:
    """PEFT's own Arrow test scenario (LoRA on a tiny GPT-2, rng_seed 42), prototypes PEFT's."""
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    ours = gpt2_lib.routed_model(
        load_base(gpt2_dir), top_k=top_k, method="peft", general="kind=general" if gks else None, seed=seed
    )
    ref = _peft_arrow(gpt2_lib, gpt2_dir, tmp_path, top_k=top_k, gks=gks, seed=seed)
    with torch.no_grad():
        got, want = ours(ids).logits, ref(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name, layer in ours.layers.items():  # PEFT's power iteration, bit for bit, from this seed
        peft_layer = ref.get_submodule(f"base_model.model.{name}").lora_arrow["arrow_router"]
        assert torch.equal(layer.prototypes, peft_layer.prototypes), name
        assert not torch.allclose(load_base(gpt2_dir)(ids).logits, want, atol=1e-3)  # adapters act


@torch.no_grad()
def test_routed_gpt2_float64_matches_peft_within_1e6(
    gpt2_lib: Library, gpt2_dir: Path, tmp_path: Path
) -> None:
    from peft import ArrowConfig, create_arrow_model

    tasks = [str(gpt2_lib.export(e.name, tmp_path / e.name)) for e in gpt2_lib.experts("kind=task")]
    ref = create_arrow_model(
        load_base(gpt2_dir).double(),
        task_specific_adapter_paths=tasks,
        arrow_config=ArrowConfig(top_k=2, rng_seed=SEED),
    ).eval()
    ref.double()
    ours = gpt2_lib.routed_model(load_base(gpt2_dir).double(), top_k=2, method="peft", dtype=torch.float64)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=1e-6, rtol=0)


def test_the_seed_reaches_the_power_iteration(gpt2_lib: Library, gpt2_dir: Path) -> None:
    """``seed`` was fixed to 0: seeds 0 and 42 start PEFT's 15 steps from different vectors."""
    a = gpt2_lib.routed_model(load_base(gpt2_dir), method="peft", seed=0)
    b = gpt2_lib.routed_model(load_base(gpt2_dir), method="peft", seed=42)
    layer = "transformer.h.0.mlp.c_fc"
    assert not torch.equal(a.layers[layer].prototypes, b.layers[layer].prototypes)


def test_cli_seed_and_method_reach_export_routed(gpt2_lib: Library, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from libstore.cli import cli

    db = [] if gpt2_lib.context.catalog.is_sqlite else ["--db", gpt2_lib.context.catalog.url]
    prompt = "w5 w17 w3 w99 w42"
    args = ["-L", str(gpt2_lib.path), *db, "export-routed", "--prompt", prompt, "--top-k", "1"]
    result = CliRunner().invoke(
        cli, [*args, str(tmp_path / "cli"), "--method", "peft", "--seed", "42"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    api = gpt2_lib.export_routed(tmp_path / "api", prompt=prompt, top_k=1, method="peft", seed=42)
    cli_doc = json.loads((tmp_path / "cli" / "libstore_routing.json").read_text())
    api_doc = json.loads((api.path / "libstore_routing.json").read_text())
    assert cli_doc["routes"] == api_doc["routes"]
    assert (cli_doc["prototype_method"], cli_doc["seed"]) == ("peft", 42)


def test_export_of_a_gpt2_expert_loads_in_peft(gpt2_lib: Library, gpt2_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    out = gpt2_lib.export("task1", tmp_path / "exported")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True  # as PEFT saved
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(2))
    routed = gpt2_lib.routed_model(load_base(gpt2_dir), experts=["task1"], top_k=1)
    with torch.no_grad():
        peft_out = PeftModel.from_pretrained(load_base(gpt2_dir), str(out)).eval()(ids).logits
        torch.testing.assert_close(routed(ids).logits, peft_out, atol=1e-5, rtol=1e-5)


def test_export_routed_gpt2_is_the_routed_model(gpt2_lib: Library, gpt2_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoTokenizer

    prompt = "w5 w17 w3 w99 w42"
    report = gpt2_lib.export_routed(tmp_path / "served", prompt=prompt, top_k=2, base=str(gpt2_dir))
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    routed = gpt2_lib.routed_model(load_base(gpt2_dir), top_k=2)
    with torch.no_grad():
        with routed.sequence_routing() as routes:
            routed.model(input_ids=ids)
        with routed.pinned(routes):
            ours = routed.model(input_ids=ids).logits
        served = PeftModel.from_pretrained(load_base(gpt2_dir), str(report.path)).eval()
        torch.testing.assert_close(served(input_ids=ids).logits, ours, atol=2e-5, rtol=1e-5)


def test_prototypes_of_gpt2_experts_are_those_the_router_uses(gpt2_lib: Library, gpt2_dir: Path) -> None:
    report = gpt2_lib.compute_prototypes("kind=task")
    assert len(report.computed) == 4
    routed = gpt2_lib.routed_model(load_base(gpt2_dir))
    assert "transformer.h.0.attn.c_attn" in routed.layers and "transformer.h.1.mlp.c_fc" in routed.layers


def test_gpt2_adapter_on_a_llama_base_names_the_layer_types(
    library: Library, gpt2_dir: Path, tmp_path: Path
) -> None:
    """Before Conv1D support every GPT-2 adapter got 'It was trained on another model' even on GPT-2."""
    folder = make_adapter(gpt2_dir, tmp_path / "g", targets=("c_attn",))
    with pytest.raises(BaseModelMismatchError) as err:
        library.add(folder, name="g", base="tiny")
    msg = str(err.value)
    assert "'transformer.h.0.attn.c_attn' is not an nn.Linear or Conv1D layer of base model 'tiny'" in msg
    assert "of another type, LoRA on it is not supported" in msg


def test_adapter_on_an_unsupported_layer_type_names_the_type(gpt2_lib: Library, tmp_path: Path) -> None:
    """A module the base has, of a type LoRA cannot adapt here (LayerNorm): the error names both."""
    from safetensors.torch import save_file

    src = Path(gpt2_lib.get("task0").source or "")
    folder = tmp_path / "ln"
    folder.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text()) | {"target_modules": ["ln_1"]}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    prefix = "base_model.model.transformer.h.0.ln_1"
    tensors = {f"{prefix}.lora_A.weight": torch.ones(4, 32), f"{prefix}.lora_B.weight": torch.ones(32, 4)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    with pytest.raises(BaseModelMismatchError) as err:
        gpt2_lib.add(folder, name="ln")
    msg = str(err.value)
    assert "'transformer.h.0.ln_1' is not an nn.Linear or Conv1D layer" in msg
    assert "is a torch.nn.modules.normalization.LayerNorm: LoRA on that layer type is not supported" in msg


def test_router_names_an_unsupported_module_type(gpt2_dir: Path) -> None:
    model = load_base(gpt2_dir)
    ex = ExpertTensors("e", 1.0, {"transformer.h.0.ln_1": (torch.zeros(2, 32), torch.zeros(32, 2))})
    with pytest.raises(
        RouterError, match=r"'transformer.h.0.ln_1' is a torch.nn.modules.normalization.LayerNorm"
    ):
        build_router(model, [ex])
