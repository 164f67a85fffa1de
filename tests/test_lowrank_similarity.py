"""Similarity: the trace formula against dense Frobenius products, flat cosine against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import libstore.lowrank.similarity as sim
from libstore.errors import IncompatibleExpertsError, ValidationError
from libstore.lowrank.similarity import delta_cosine_matrix, flat_cosine_matrix, flatten_lora, frobenius_inner

F64 = torch.float64


def _experts(n: int, ranks: list[int], shapes: list[tuple[int, int]], seed: int, dtype=F64):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        r = ranks[i % len(ranks)]
        out.append(
            [
                (
                    torch.randn(r, n_in, generator=g, dtype=F64).to(dtype),
                    torch.randn(n_out, r, generator=g, dtype=F64).to(dtype),
                    float(torch.rand(1, generator=g)) + 0.5,
                )
                for n_in, n_out in shapes
            ]
        )
    return out


def _dense_cosine(experts) -> torch.Tensor:  # type: ignore[no-untyped-def]
    flat = torch.stack(
        [torch.cat([(s * B.double() @ A.double()).flatten() for A, B, s in e]) for e in experts]
    )
    norms = flat.norm(dim=1)
    return (flat @ flat.T) / torch.outer(norms, norms)


def test_frobenius_inner_matches_dense() -> None:
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(4, 30, generator=g, dtype=F64), torch.randn(20, 4, generator=g, dtype=F64)
    A2, B2 = torch.randn(7, 30, generator=g, dtype=F64), torch.randn(20, 7, generator=g, dtype=F64)
    got = frobenius_inner(A1, B1, 0.5, A2, B2, 3.0)
    want = ((0.5 * B1 @ A1) * (3.0 * B2 @ A2)).sum()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_frobenius_inner_batched_with_scale_tensors() -> None:
    g = torch.Generator().manual_seed(1)
    A1, B1 = torch.randn(5, 4, 30, generator=g), torch.randn(5, 20, 4, generator=g)
    A2, B2 = torch.randn(5, 4, 30, generator=g), torch.randn(5, 20, 4, generator=g)
    s1, s2 = torch.rand(5, generator=g), torch.rand(5, generator=g)
    got = frobenius_inner(A1, B1, s1, A2, B2, s2)
    assert got.shape == (5,) and got.dtype == torch.float32
    want = (
        ((B1.double() @ A1.double()) * (B2.double() @ A2.double())).sum((-2, -1)) * s1.double() * s2.double()
    )
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    with pytest.raises(IncompatibleExpertsError):
        frobenius_inner(A1, B1, 1.0, A2[..., :29], B2, 1.0)


def test_delta_cosine_matches_dense_with_mixed_ranks() -> None:
    experts = _experts(7, [4, 8, 2], [(24, 16), (16, 40), (32, 32)], seed=2)
    got = delta_cosine_matrix(experts)
    assert got.shape == (7, 7) and got.dtype == F64
    torch.testing.assert_close(got, _dense_cosine(experts), rtol=0, atol=1e-12)
    assert torch.equal(got, got.T) and torch.equal(got.diagonal(), torch.ones(7, dtype=F64))


def test_delta_cosine_chunked_equals_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    experts = _experts(37, [4, 3], [(20, 12), (12, 20)], seed=3)
    whole = delta_cosine_matrix(experts)
    monkeypatch.setattr(sim, "_MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(sim, "_BLOCK_BYTES", 4 * 37 * 16 * 5)  # 5 experts per chunk
    chunked = delta_cosine_matrix(experts)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-13)
    torch.testing.assert_close(chunked, _dense_cosine(experts), rtol=0, atol=1e-12)
    assert torch.equal(chunked, chunked.T)


def test_delta_cosine_fp32_and_bf16() -> None:
    experts = _experts(6, [4], [(64, 48), (48, 64)], seed=4, dtype=torch.bfloat16)
    got = delta_cosine_matrix(experts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _dense_cosine(experts), rtol=0, atol=1e-5)


def test_delta_cosine_is_gauge_invariant() -> None:
    experts = _experts(3, [4], [(20, 12)], seed=5)
    g = torch.Generator().manual_seed(6)
    G = torch.randn(4, 4, generator=g, dtype=F64) + 3 * torch.eye(4, dtype=F64)
    A, B, s = experts[1][0]
    regauged = [experts[0], [(G @ A, B @ torch.linalg.inv(G), s)], experts[2]]
    torch.testing.assert_close(
        delta_cosine_matrix(regauged), delta_cosine_matrix(experts), rtol=0, atol=1e-12
    )
    # the flattened-parameter cosine is not: that is why the exact one is the default
    flat = flat_cosine_matrix(torch.stack([flatten_lora([(A, B) for A, B, _ in e]) for e in regauged]))
    flat0 = flat_cosine_matrix(torch.stack([flatten_lora([(A, B) for A, B, _ in e]) for e in experts]))
    assert float((flat - flat0).abs().max()) > 1e-3


def test_zero_norm_experts() -> None:
    experts = _experts(4, [4], [(20, 12), (12, 20)], seed=7)
    experts[2] = [(A, torch.zeros_like(B), s) for A, B, s in experts[2]]  # PEFT's init: B = 0
    got = delta_cosine_matrix(experts)
    assert torch.equal(got[2], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=F64))
    assert torch.equal(got[:, 2], got[2])
    keep = [0, 1, 3]
    torch.testing.assert_close(
        got[keep][:, keep], _dense_cosine([experts[i] for i in keep]), rtol=0, atol=1e-12
    )
    flat = torch.randn(3, 10, dtype=F64)
    flat[1] = 0
    fc = flat_cosine_matrix(flat)
    assert torch.equal(fc[1], torch.tensor([0.0, 1.0, 0.0], dtype=F64))


def test_delta_cosine_identical_and_opposite_experts() -> None:
    (e,) = _experts(1, [4], [(20, 12)], seed=8)
    neg = [(A, -B, s) for A, B, s in e]
    got = delta_cosine_matrix([e, e, neg])
    torch.testing.assert_close(got, torch.tensor([[1.0, 1, -1], [1, 1, -1], [-1, -1, 1]], dtype=F64))
    assert float(got.abs().max()) <= 1.0


def test_delta_cosine_refuses_misaligned_experts() -> None:
    a, b = _experts(2, [4], [(20, 12), (12, 20)], seed=9)
    with pytest.raises(IncompatibleExpertsError, match="modules"):
        delta_cosine_matrix([a, b[:1]])
    with pytest.raises(IncompatibleExpertsError, match="aligned"):
        delta_cosine_matrix([a, [b[1], b[0]]])
    with pytest.raises(ValidationError):
        delta_cosine_matrix([])


def _numpy_cosine(X: torch.Tensor) -> torch.Tensor:
    Y = X.double().numpy()
    Y = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    return torch.from_numpy(Y @ Y.T)


def test_flat_cosine_matches_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(10)
    X = torch.randn(9, 1000, generator=g)
    got = flat_cosine_matrix(X)
    assert got.dtype == torch.float32 and torch.equal(got, got.T)
    torch.testing.assert_close(got.double(), _numpy_cosine(X), rtol=0, atol=1e-6)
    monkeypatch.setattr(sim, "_BLOCK_BYTES", 4 * 9 * 64)  # 64 columns per chunk, each upcast on its own
    Xb = X.bfloat16()
    torch.testing.assert_close(flat_cosine_matrix(Xb).double(), _numpy_cosine(Xb), rtol=0, atol=1e-6)
    with pytest.raises(ValidationError):
        flat_cosine_matrix(torch.randn(3))


def test_flatten_lora_order() -> None:
    A1, B1 = torch.arange(6.0).reshape(2, 3), torch.arange(4.0).reshape(2, 2) + 100
    A2, B2 = torch.ones(1, 2), torch.zeros(3, 1)
    v = flatten_lora([(A1, B1), (A2, B2)])
    assert torch.equal(v, torch.cat([A1.flatten(), B1.flatten(), A2.flatten(), B2.flatten()]))
    m = flatten_lora({"z.q_proj": (A2, B2), "a.q_proj": (A1, B1)})  # mappings: sorted by module name
    assert torch.equal(m, v)
    assert flatten_lora([(A1.half(), B1.half())]).dtype == torch.float32


def test_streamed_similarities_equal_dense_references() -> None:
    """Groups of modules (any cut) and column blocks add up to the whole: the production path equals
    the dense references, in float64."""
    shapes = [(6, 5), (4, 7), (5, 5), (3, 8)]
    experts = _experts(5, [2, 3, 4], shapes, seed=11)
    want = _dense_cosine(experts)
    for cut in ([4], [1, 3], [1, 1, 1, 1], [2, 2]):
        groups, start = [], 0
        for size in cut:
            groups.append([e[start : start + size] for e in experts])
            start += size
        got = sim.delta_similarity(iter(groups))
        assert got.dtype == F64
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    vectors = torch.randn(6, 40, generator=torch.Generator().manual_seed(2), dtype=F64)
    vectors[3] = 0.0  # a zero row: cosine 0 with the others, 1 with itself
    norms = vectors.norm(dim=1).clamp_min(1e-300)
    ref = (vectors @ vectors.T) / torch.outer(norms, norms)
    ref[3] = 0.0
    ref[:, 3] = 0.0
    ref.fill_diagonal_(1.0)
    for width in (1, 7, 40):
        blocks = [vectors[:, j : j + width] for j in range(0, 40, width)]
        torch.testing.assert_close(sim.flat_similarity(iter(blocks)), ref, atol=1e-12, rtol=0)
    with pytest.raises(ValidationError):
        sim.delta_similarity(iter(()))
    with pytest.raises(ValidationError):
        sim.flat_similarity(iter(()))


def test_module_groups_fit_the_budget() -> None:
    widths = {"m3": 10, "m1": 10, "m2": 30, "m0": 5}
    assert sim.module_groups(widths, 2, 10**9) == [["m0", "m1", "m2", "m3"]]
    # n = 2 experts of float32: m0 40 B, m1 80 B, m2 240 B, m3 80 B
    assert sim.module_groups(widths, 2, 120) == [["m0", "m1"], ["m2"], ["m3"]]
    assert sim.module_groups(widths, 2, 1) == [["m0"], ["m1"], ["m2"], ["m3"]]
