"""Merges in ΔW space against the dense weighted average."""

from __future__ import annotations

import pytest
import torch

from libstore.errors import IncompatibleExpertsError, ValidationError
from libstore.lowrank.merge import LowRankDelta, merge_delta

F64 = torch.float64


def _modules(seed: int, ranks: list[int], batch: tuple[int, ...] = (), n_in: int = 40, n_out: int = 32):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(*batch, r, n_in, generator=g, dtype=F64),
            torch.randn(*batch, n_out, r, generator=g, dtype=F64),
            float(torch.rand(1, generator=g)) + 0.5,
        )
        for r in ranks
    ]


def _dense(mods, weights) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return sum(w * s * B @ A for (A, B, s), w in zip(mods, weights, strict=True))


def test_default_is_the_average_of_the_updates() -> None:
    mods = _modules(0, [4, 8, 2])
    m = merge_delta(mods)
    assert isinstance(m, LowRankDelta) and m.rank == 14 and m.scale == 1.0 and m.energy_kept == 1.0
    torch.testing.assert_close(m.delta(), _dense(mods, [1 / 3] * 3), rtol=1e-12, atol=1e-12)


def test_weights_and_batch_dims() -> None:
    mods = _modules(1, [4, 4], batch=(3,))
    m = merge_delta(mods, weights=[0.7, -0.2])
    assert m.A.shape == (3, 8, 40) and m.B.shape == (3, 32, 8)
    torch.testing.assert_close(m.delta(), _dense(mods, [0.7, -0.2]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 3, 8])
def test_truncation_is_optimal_and_reports_energy(rank: int) -> None:
    mods = _modules(2, [4, 4, 4])
    m = merge_delta(mods, rank=rank)
    dense = _dense(mods, [1 / 3] * 3)
    U, S, Vh = torch.linalg.svd(dense)
    torch.testing.assert_close(m.delta(), U[:, :rank] * S[:rank] @ Vh[:rank], rtol=1e-10, atol=1e-10)
    assert m.energy_kept == pytest.approx(float(S[:rank].square().sum() / S.square().sum()), rel=1e-12)
    assert m.A.shape == (rank, 40) and m.B.shape == (32, rank)


def test_truncation_batched_energy_is_summed_over_the_batch() -> None:
    mods = _modules(3, [4, 4], batch=(2,))
    m = merge_delta(mods, rank=3)
    dense = _dense(mods, [0.5, 0.5])
    S = torch.linalg.svdvals(dense)  # (2, k)
    assert m.energy_kept == pytest.approx(float(S[:, :3].square().sum() / S.square().sum()), rel=1e-12)
    for i in range(2):
        one = merge_delta([(A[i], B[i], s) for A, B, s in mods], rank=3)
        torch.testing.assert_close(one.delta(), m.delta()[i], rtol=1e-10, atol=1e-10)


def test_rank_above_the_exact_rank_pads_with_zeros() -> None:
    mods = _modules(4, [2, 1])
    m = merge_delta(mods, rank=6)
    assert m.A.shape == (6, 40) and m.B.shape == (32, 6) and m.energy_kept == 1.0
    assert float(m.A[3:].abs().max()) == 0.0 and float(m.B[:, 3:].abs().max()) == 0.0
    torch.testing.assert_close(m.delta(), _dense(mods, [0.5, 0.5]), rtol=1e-12, atol=1e-12)


def test_fp32_and_half_inputs() -> None:
    mods = [(A.bfloat16(), B.bfloat16(), s) for A, B, s in _modules(5, [4, 4])]
    m = merge_delta(mods, rank=8)
    assert m.A.dtype == torch.float32
    ref = _dense([(A.double(), B.double(), s) for A, B, s in mods], [0.5, 0.5])
    torch.testing.assert_close(m.delta().double(), ref, rtol=0, atol=1e-4)


def test_rescaled_keeps_the_update() -> None:
    m = merge_delta(_modules(6, [4, 4]), rank=4)
    r = m.rescaled(2.0)
    assert r.scale == 2.0
    torch.testing.assert_close(r.delta(), m.delta(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValidationError):
        m.rescaled(0.0)


def test_invalid_merges() -> None:
    mods = _modules(7, [4, 4])
    with pytest.raises(ValidationError):
        merge_delta([])
    with pytest.raises(ValidationError, match="weights"):
        merge_delta(mods, weights=[1.0])
    with pytest.raises(ValidationError, match="rank"):
        merge_delta(mods, rank=0)
    with pytest.raises(ValidationError, match="finite"):
        merge_delta(mods, weights=[1.0, float("nan")])
    other = _modules(8, [4], n_in=41)
    with pytest.raises(IncompatibleExpertsError, match="same Linear"):
        merge_delta([mods[0], other[0]])
