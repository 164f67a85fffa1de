"""Arrow prototypes: exact method against dense float64 SVD, peft method bit for bit against PEFT."""

from __future__ import annotations

import math

import pytest
import torch
from peft import ArrowConfig
from peft.tuners.lora.arrow import ArrowLoraLinearLayer

from libstore.errors import ValidationError
from libstore.lowrank.prototypes import (
    EXACT_METHOD_VERSION,
    PEFT_METHOD_VERSION,
    Prototypes,
    exact_prototypes,
    peft_prototypes,
)


def _dense(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values and right singular vectors (rows) of ΔW by dense float64 SVD."""
    _, S, Vh = torch.linalg.svd(scale * (B.double() @ A.double()), full_matrices=False)
    return S, Vh


def _abs_cos(u: torch.Tensor, v: torch.Tensor) -> float:
    u, v = u.double(), v.double()
    return float((u @ v).abs() / (u.norm() * v.norm()))


def _planted(
    spectrum: list[float], n_in: int, n_out: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors with a chosen spectrum: B·A = U·diag(σ)·Vᵀ (then re-gauged), plus V (r, in)."""
    g = torch.Generator().manual_seed(seed)
    r = len(spectrum)
    V = torch.linalg.qr(torch.randn(n_in, r, generator=g, dtype=torch.float64))[0].mT  # (r, in)
    U = torch.linalg.qr(torch.randn(n_out, r, generator=g, dtype=torch.float64))[0]
    G = torch.randn(r, r, generator=g, dtype=torch.float64) + 3 * torch.eye(r, dtype=torch.float64)
    A = G @ V
    B = U @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ torch.linalg.inv(G)
    return A.float(), B.float(), V


def _check_sign_and_norm(p: Prototypes) -> None:
    v = p.vectors
    assert v.dtype == torch.float32
    torch.testing.assert_close(
        torch.linalg.vector_norm(v, dim=-1), torch.ones(v.shape[:-1]), atol=1e-6, rtol=0
    )
    idx = v.abs().argmax(dim=-1, keepdim=True)
    assert bool((torch.gather(v, -1, idx) > 0).all())


def test_method_versions_are_ints() -> None:
    assert isinstance(EXACT_METHOD_VERSION, int) and isinstance(PEFT_METHOD_VERSION, int)


@pytest.mark.parametrize(("r", "n_in", "n_out"), [(4, 64, 48), (16, 128, 256), (8, 40, 5), (1, 30, 20)])
def test_exact_matches_dense_svd(r: int, n_in: int, n_out: int) -> None:
    g = torch.Generator().manual_seed(r * 1000 + n_in)
    A = torch.randn(r, n_in, generator=g)
    B = torch.randn(n_out, r, generator=g)
    top_n = min(3, r, n_out)
    p = exact_prototypes(A, B, 0.5, top_n=top_n)
    S, Vh = _dense(A, B, 0.5)
    assert p.vectors.shape == (top_n, n_in) and p.values.shape == (top_n,)
    assert p.values.dtype == torch.float32
    torch.testing.assert_close(p.values.double(), S[:top_n], rtol=1e-5, atol=1e-6)
    for k in range(top_n):
        assert _abs_cos(p.vectors[k], Vh[k]) > 0.99999
    _check_sign_and_norm(p)


def test_exact_is_deterministic_and_sign_rule_holds() -> None:
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(8, 100, generator=g), torch.randn(90, 8, generator=g)
    p1, p2 = exact_prototypes(A, B, top_n=4), exact_prototypes(A.clone(), B.clone(), top_n=4)
    assert torch.equal(p1.vectors, p2.vectors) and torch.equal(p1.values, p2.values)
    # a negative scale flips ΔW; the vectors are the same after the sign rule
    p3 = exact_prototypes(A, B, -1.0, top_n=4)
    torch.testing.assert_close(p3.vectors, p1.vectors, atol=1e-6, rtol=0)
    torch.testing.assert_close(p3.values, p1.values)
    _check_sign_and_norm(p1)


def test_gauge_invariance() -> None:
    """ΔW = B·A = (B·G⁻¹)·(G·A): the prototype depends on ΔW only."""
    g = torch.Generator().manual_seed(2)
    A, B = (
        torch.randn(6, 80, generator=g, dtype=torch.float64),
        torch.randn(70, 6, generator=g, dtype=torch.float64),
    )
    G = torch.randn(6, 6, generator=g, dtype=torch.float64) + 4 * torch.eye(6, dtype=torch.float64)
    p1 = exact_prototypes(A.float(), B.float(), top_n=2)
    p2 = exact_prototypes((G @ A).float(), (B @ torch.linalg.inv(G)).float(), top_n=2)
    torch.testing.assert_close(p1.vectors, p2.vectors, atol=1e-5, rtol=0)
    torch.testing.assert_close(p1.values, p2.values, rtol=1e-5, atol=0)


@pytest.mark.parametrize("gap", [0.0, 1e-7, 1e-4])
def test_repeated_or_near_equal_top_values_lie_in_top_subspace(gap: float) -> None:
    A, B, V = _planted([5.0, 5.0 * (1 - gap), 1.0, 0.5], 96, 64, seed=3)
    p = exact_prototypes(A, B, top_n=2)
    top = V[:2].float()  # orthonormal basis of the top-2 right singular subspace
    for k in range(2):
        v = p.vectors[k]
        assert float(torch.linalg.vector_norm(top @ v)) > 1 - 1e-5  # inside span(top)
    # the two vectors are orthonormal: together they span the top subspace
    torch.testing.assert_close(p.vectors @ p.vectors.mT, torch.eye(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(p.values, torch.tensor([5.0, 5.0 * (1 - gap)]), rtol=1e-5, atol=0)


def test_rank_deficient_A() -> None:
    g = torch.Generator().manual_seed(4)
    A = torch.randn(6, 50, generator=g)
    A[3] = A[0] * 2 - A[1]  # rank 5
    A[5] = 0
    B = torch.randn(40, 6, generator=g)
    p = exact_prototypes(A, B, top_n=4)
    S, Vh = _dense(A, B)
    torch.testing.assert_close(p.values.double(), S[:4], rtol=1e-5, atol=1e-5)
    for k in range(4):
        assert _abs_cos(p.vectors[k], Vh[k]) > 0.99999
    _check_sign_and_norm(p)


def test_rank_deficient_B_and_vectors_past_the_rank() -> None:
    g = torch.Generator().manual_seed(5)
    A = torch.randn(4, 50, generator=g)
    B = torch.randn(40, 4, generator=g)
    B[:, 2:] = 0  # ΔW has rank 2
    p = exact_prototypes(A, B, top_n=4)
    _, Vh = _dense(A, B)
    for k in range(2):
        assert _abs_cos(p.vectors[k], Vh[k]) > 0.99999
    assert float(p.values[2:].abs().max()) < 1e-4
    # past the rank: still orthonormal, inside A's row space
    torch.testing.assert_close(p.vectors @ p.vectors.mT, torch.eye(4), atol=1e-5, rtol=0)
    qa = torch.linalg.qr(A.mT)[0]
    torch.testing.assert_close(
        torch.linalg.vector_norm(p.vectors @ qa, dim=-1), torch.ones(4), atol=1e-5, rtol=0
    )


def test_zero_B_gives_top_singular_vector_of_A_and_value_zero() -> None:
    g = torch.Generator().manual_seed(6)
    A = torch.randn(8, 64, generator=g)
    B = torch.zeros(32, 8)
    p = exact_prototypes(A, B, 2.0, top_n=2)
    assert torch.equal(p.values, torch.zeros(2))
    _, Vh_A = torch.linalg.svd(A.double(), full_matrices=False)[1:]
    for k in range(2):
        assert _abs_cos(p.vectors[k], Vh_A[k]) > 0.99999
    _check_sign_and_norm(p)
    again = exact_prototypes(A, B, 2.0, top_n=2)
    assert torch.equal(p.vectors, again.vectors)


def test_zero_A_and_B_give_finite_unit_vectors() -> None:
    p = exact_prototypes(torch.zeros(4, 20), torch.zeros(10, 4), top_n=2)
    assert bool(torch.isfinite(p.vectors).all())
    assert torch.equal(p.values, torch.zeros(2))
    _check_sign_and_norm(p)


def test_batch_mixing_zero_and_nonzero_modules() -> None:
    g = torch.Generator().manual_seed(7)
    A = torch.randn(3, 4, 30, generator=g)
    B = torch.randn(3, 20, 4, generator=g)
    B[1] = 0
    p = exact_prototypes(A, B)
    for i in range(3):
        one = exact_prototypes(A[i], B[i])
        torch.testing.assert_close(p.vectors[i], one.vectors, atol=1e-6, rtol=0)
        torch.testing.assert_close(p.values[i], one.values, atol=1e-6, rtol=1e-6)
    assert float(p.values[1, 0]) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_upcast(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(8)
    A = (torch.randn(8, 64, generator=g) / 8).to(dtype)
    B = (torch.randn(48, 8, generator=g) / 8).to(dtype)
    p = exact_prototypes(A, B, 2.0)
    assert p.vectors.dtype == torch.float32 and p.values.dtype == torch.float32
    S, Vh = _dense(A, B, 2.0)  # truth from the same (rounded) stored values
    assert _abs_cos(p.vectors[0], Vh[0]) > 0.99999
    torch.testing.assert_close(p.values.double(), S[:1], rtol=1e-5, atol=0)


def test_rslora_scale_and_per_module_scale_tensor() -> None:
    g = torch.Generator().manual_seed(9)
    r, alpha = 16, 32
    A, B = torch.randn(2, r, 64, generator=g), torch.randn(2, 48, r, generator=g)
    rs = alpha / math.sqrt(r)
    p = exact_prototypes(A, B, torch.tensor([rs, alpha / r]))
    for i, s in enumerate([rs, alpha / r]):
        S, Vh = _dense(A[i], B[i], s)
        torch.testing.assert_close(p.values[i].double(), S[:1], rtol=1e-5, atol=0)
        assert _abs_cos(p.vectors[i, 0], Vh[0]) > 0.99999


def test_batched_equals_one_by_one() -> None:
    g = torch.Generator().manual_seed(10)
    A = torch.randn(3, 5, 8, 128, generator=g)
    B = torch.randn(3, 5, 96, 8, generator=g)
    scale = torch.rand(3, 5, generator=g) + 0.5
    p = exact_prototypes(A, B, scale, top_n=2)
    assert p.vectors.shape == (3, 5, 2, 128) and p.values.shape == (3, 5, 2)
    for i in range(3):
        for j in range(5):
            one = exact_prototypes(A[i, j], B[i, j], float(scale[i, j]), top_n=2)
            torch.testing.assert_close(p.vectors[i, j], one.vectors, atol=1e-5, rtol=0)
            torch.testing.assert_close(p.values[i, j], one.values, rtol=1e-6, atol=0)


def test_float64_inputs_stay_float64_and_are_tight() -> None:
    g = torch.Generator().manual_seed(11)
    A = torch.randn(8, 64, generator=g, dtype=torch.float64)
    B = torch.randn(48, 8, generator=g, dtype=torch.float64)
    p = exact_prototypes(A, B, top_n=3)
    S, Vh = _dense(A, B)
    assert p.vectors.dtype == torch.float64
    torch.testing.assert_close(p.values, S[:3], rtol=1e-12, atol=0)
    for k in range(3):
        assert abs(_abs_cos(p.vectors[k], Vh[k]) - 1) < 1e-10


def test_invalid_arguments() -> None:
    A, B = torch.randn(4, 20), torch.randn(10, 4)
    with pytest.raises(ValidationError, match="top_n"):
        exact_prototypes(A, B, top_n=5)
    with pytest.raises(ValidationError, match="top_n"):
        exact_prototypes(A, B, top_n=0)
    with pytest.raises(ValidationError, match="layout"):
        exact_prototypes(A, torch.randn(10, 3))
    with pytest.raises(ValidationError, match="scale"):
        exact_prototypes(torch.randn(2, 4, 20), torch.randn(2, 10, 4), torch.ones(3))
    bad = A.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValidationError, match="non-finite"):
        exact_prototypes(bad, B)
    with pytest.raises(ValidationError, match="floating"):
        exact_prototypes(A.to(torch.int64), B)


# ---------------------------------------------------------------------------------------------- peft


def _peft_layer(seed: int, n_in: int) -> ArrowLoraLinearLayer:
    cfg = ArrowConfig(top_k=1, rng_seed=seed)
    cfg.task_adapter_names = ["task_0"]
    cfg.gks_adapter_names = []
    return ArrowLoraLinearLayer(n_in, cfg)


@pytest.mark.parametrize("seed", [0, 42, 12345])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peft_method_is_bit_identical_to_peft(seed: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    A = torch.randn(4, 6, 96, generator=g).to(dtype)
    B = torch.randn(4, 80, 6, generator=g).to(dtype)
    mine = peft_prototypes(A, B, seed=seed)
    layer = _peft_layer(seed, 96)
    assert mine.vectors.shape == (4, 1, 96) and mine.vectors.dtype == torch.float32
    for i in range(4):
        theirs = layer.top_right_singular_vec_from_BA(A[i], B[i])
        assert torch.equal(mine.vectors[i, 0], theirs)
        one = peft_prototypes(A[i], B[i], seed=seed)
        assert torch.equal(one.vectors[0], theirs)


def test_peft_method_iters_and_eps_are_peft_arguments() -> None:
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, 40, generator=g), torch.randn(30, 4, generator=g)
    layer = _peft_layer(7, 40)
    for iters, eps in [(1, 1e-8), (40, 1e-6)]:
        theirs = layer.top_right_singular_vec_from_BA(A, B, iters=iters, eps=eps)
        assert torch.equal(peft_prototypes(A, B, iters=iters, eps=eps, seed=7).vectors[0], theirs)


def test_peft_and_exact_agree_when_the_gap_is_large() -> None:
    A, B, _ = _planted([4.0, 1.0, 0.5, 0.2], 128, 96, seed=12)
    exact = exact_prototypes(A, B, 2.0)
    approx = peft_prototypes(A, B, 2.0)
    assert _abs_cos(exact.vectors[0], approx.vectors[0]) > 0.99999
    torch.testing.assert_close(approx.values, exact.values, rtol=1e-5, atol=0)
    torch.testing.assert_close(exact.values, torch.tensor([8.0]), rtol=1e-5, atol=0)


def test_peft_has_not_converged_when_the_gap_is_small() -> None:
    """Why exact is the default: with σ₂/σ₁ = 0.99, 15 power steps leave most of the σ₂ direction."""
    A, B, V = _planted([1.0, 0.99, 0.5], 128, 96, seed=13)
    exact = exact_prototypes(A, B)
    approx = peft_prototypes(A, B)
    assert _abs_cos(exact.vectors[0], V[0].float()) > 0.99999
    assert _abs_cos(approx.vectors[0], V[0].float()) < 0.999
