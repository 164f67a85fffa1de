"""GenKnowSub: parameter mode bit for bit against PEFT's create_arrow_model, delta mode against dense ΔW."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from libstore.errors import IncompatibleExpertsError, ValidationError
from libstore.lowrank.gks import Residual, subtract_general_delta, subtract_general_param
from libstore.lowrank.merge import merge_delta
from libstore.lowrank.prototypes import peft_prototypes

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _tiny_llama():  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
    )
    return LlamaForCausalLM(cfg).eval()


def _save_adapter(folder: Path, seed: int) -> dict[str, torch.Tensor]:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    model = get_peft_model(
        _tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    )
    torch.manual_seed(seed)
    with torch.no_grad():  # fresh random factors per adapter (init_lora_weights=False makes B non-zero)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(folder)
    return load_file(folder / "adapter_model.safetensors")


def test_param_mode_is_bit_identical_to_peft_create_arrow_model(tmp_path: Path) -> None:
    from peft import ArrowConfig, create_arrow_model

    tasks = [_save_adapter(tmp_path / f"task{i}", seed=10 + i) for i in range(3)]
    generals = [_save_adapter(tmp_path / f"gen{i}", seed=20 + i) for i in range(2)]
    model = create_arrow_model(
        base_model=_tiny_llama(),
        task_specific_adapter_paths=[str(tmp_path / f"task{i}") for i in range(3)],
        general_adapter_paths=[str(tmp_path / f"gen{i}") for i in range(2)],
        arrow_config=ArrowConfig(top_k=2, use_gks=True, rng_seed=42),
    )
    with torch.no_grad():  # GKS and prototypes are applied lazily, at the first forward
        model(torch.arange(12).reshape(2, 6))

    checked = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_arrow"):
            continue
        key = name.removeprefix("base_model.model.")
        gA = [g[f"base_model.model.{key}.lora_A.weight"] for g in generals]
        gB = [g[f"base_model.model.{key}.lora_B.weight"] for g in generals]
        mine_A, mine_B = [], []
        for i, t in enumerate(tasks):
            A2, B2 = subtract_general_param(
                t[f"base_model.model.{key}.lora_A.weight"], t[f"base_model.model.{key}.lora_B.weight"], gA, gB
            )
            assert torch.equal(module.lora_A[f"task_{i}"].weight, A2), (name, i)
            assert torch.equal(module.lora_B[f"task_{i}"].weight, B2), (name, i)
            mine_A.append(A2)
            mine_B.append(B2)
        # ... and PEFT's prototypes are the peft method on the residuals, bit for bit, stacked in one call
        protos = peft_prototypes(torch.stack(mine_A), torch.stack(mine_B), seed=42)
        assert torch.equal(module.lora_arrow["arrow_router"].prototypes, protos.vectors[:, 0]), name
        checked += 1
    assert checked == 2 * len(TARGETS)


def test_param_mode_formula_and_batching() -> None:
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 4, 30, generator=g), torch.randn(2, 20, 4, generator=g)
    gA = [torch.randn(2, 4, 30, generator=g) for _ in range(3)]
    gB = [torch.randn(2, 20, 4, generator=g) for _ in range(3)]
    A2, B2 = subtract_general_param(A, B, gA, gB)
    torch.testing.assert_close(A2, A - sum(gA) / 3)
    torch.testing.assert_close(B2, B - sum(gB) / 3)
    for i in range(2):
        a, b = subtract_general_param(A[i], B[i], [x[i] for x in gA], [x[i] for x in gB])
        assert torch.equal(a, A2[i]) and torch.equal(b, B2[i])
    # inputs untouched (PEFT edits in place; libstore's math is pure)
    assert torch.equal(A, torch.randn(2, 4, 30, generator=torch.Generator().manual_seed(0)))


def test_param_mode_upcasts_half_precision() -> None:
    A, B = torch.randn(4, 30).bfloat16(), torch.randn(20, 4).bfloat16()
    gA, gB = [torch.randn(4, 30).bfloat16()], [torch.randn(20, 4).bfloat16()]
    A2, B2 = subtract_general_param(A, B, gA, gB)
    assert A2.dtype == B2.dtype == torch.float32
    assert torch.equal(A2, A.float() - gA[0].float())


def test_param_mode_refuses_different_ranks_and_suggests_delta_mode() -> None:
    A, B = torch.randn(4, 30), torch.randn(20, 4)
    with pytest.raises(IncompatibleExpertsError, match="delta mode"):
        subtract_general_param(A, B, [torch.randn(8, 30)], [torch.randn(20, 8)])
    with pytest.raises(IncompatibleExpertsError, match="same layer"):
        subtract_general_param(A, B, [torch.randn(4, 31)], [torch.randn(20, 4)])
    with pytest.raises(ValidationError):
        subtract_general_param(A, B, [], [])


# ---------------------------------------------------------------------------------------------- delta


def _modules(seed: int, ranks: list[int], n_in: int = 48, n_out: int = 40):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(r, n_in, generator=g, dtype=torch.float64),
            torch.randn(n_out, r, generator=g, dtype=torch.float64),
            float(torch.rand(1, generator=g, dtype=torch.float64)) + 0.5,
        )
        for r in ranks
    ]


def _dense_residual(task, general) -> torch.Tensor:  # type: ignore[no-untyped-def]
    A, B, s = task
    return s * B @ A - sum(sg * Bg @ Ag for Ag, Bg, sg in general) / len(general)


def test_delta_mode_is_exact_in_function_space() -> None:
    task, *general = _modules(1, [4, 8, 2, 4])  # different ranks are fine in delta mode
    res = subtract_general_delta(*task, general)
    assert isinstance(res, Residual)
    assert res.scale == 1.0 and res.energy_kept == 1.0 and res.rank == 4 + 8 + 2 + 4
    assert res.A.dtype == torch.float64
    torch.testing.assert_close(res.delta(), _dense_residual(task, general), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 4, 10])
def test_delta_mode_truncated_is_the_best_rank_k_approximation(rank: int) -> None:
    task, *general = _modules(2, [6, 6, 6])
    res = subtract_general_delta(*task, general, rank=rank)
    dense = _dense_residual(task, general)
    U, S, Vh = torch.linalg.svd(dense)
    best = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
    assert res.A.shape == (rank, 48) and res.B.shape == (40, rank)
    torch.testing.assert_close(res.delta(), best, rtol=1e-10, atol=1e-10)
    energy = float(S[:rank].square().sum() / S.square().sum())
    assert res.energy_kept == pytest.approx(energy, rel=1e-12)
    # balanced gauge
    assert float(res.A.norm()) == pytest.approx(float(res.B.norm()), rel=1e-10)


def test_delta_mode_fp32_inputs() -> None:
    task, *general = _modules(3, [4, 4, 4])
    f32 = [(A.float(), B.float(), s) for A, B, s in [task, *general]]
    res = subtract_general_delta(*f32[0], f32[1:], rank=6)
    assert res.A.dtype == torch.float32
    U, S, Vh = torch.linalg.svd(_dense_residual(task, general))
    best = U[:, :6] @ torch.diag(S[:6]) @ Vh[:6]
    torch.testing.assert_close(res.delta().double(), best, rtol=0, atol=1e-4 * float(S[0]))


def test_delta_mode_is_merge_with_negative_weights() -> None:
    task, *general = _modules(4, [4, 4, 4, 4])
    res = subtract_general_delta(*task, general, rank=5)
    merged = merge_delta([task, *general], weights=[1.0, -1 / 3, -1 / 3, -1 / 3], rank=5)
    assert torch.equal(res.A, merged.A) and torch.equal(res.B, merged.B)
    assert res.energy_kept == merged.energy_kept


def test_delta_mode_general_equal_to_task_gives_zero() -> None:
    task, other = _modules(5, [4, 4])
    res = subtract_general_delta(*task, [task, task], rank=2)
    assert float(res.delta().abs().max()) < 1e-12
    assert res.energy_kept == 1.0  # nothing to lose
    with pytest.raises(ValidationError):
        subtract_general_delta(*task, [])
    with pytest.raises(IncompatibleExpertsError):
        subtract_general_delta(*task, [(torch.randn(4, 47, dtype=torch.float64), other[1], 1.0)])
