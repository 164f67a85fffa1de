"""Shared helpers of the low-rank core: input checks, working dtype, and the SVD of ΔW from its factors.

Everything in ``libstore.lowrank`` reads LoRA modules the way PEFT stores them — A (r, in), B (out, r),
scale s, ΔW = s·B·A (out, in) — optionally stacked over leading batch dims: A (..., r, in),
B (..., out, r), s a float or a tensor of shape (...).

The one numerical kernel is :func:`factor_svd`: thin Householder QR of Aᵀ and of B, then the SVD of the
small r × r core s·R_B·R_Aᵀ. That is the exact SVD of ΔW at O((in + out)·r²) cost, never forming the
out × in matrix, batched, on the inputs' device. Prototypes, truncated merges and GenKnowSub residuals
all go through it, so there is one place where the linear algebra can be wrong.

Dtypes: fp16/bf16/fp32 inputs are computed in fp32 and give fp32 results. float64 inputs stay float64
(the tests use that to compare against dense float64 algebra at tight tolerance).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from libstore.errors import IncompatibleExpertsError, ValidationError

__all__ = [
    "FactorSVD",
    "LowRankDelta",
    "Scale",
    "as_scale",
    "check_int",
    "check_module",
    "concat_factors",
    "factor_svd",
    "fix_column_signs",
    "fix_sign",
    "float64_matrix",
    "square_matrix",
    "truncate",
    "work_dtype",
]

Scale = float | Tensor
"""A LoRA scale: one float for every module of a batch, or a tensor of the batch shape (...)."""


@dataclass(frozen=True)
class LowRankDelta:
    """A weight update ΔW = scale·B·A held as factors, the result of a merge or a GenKnowSub residual.

    Attributes:
        A: (..., k, in) factor, same layout as PEFT's ``lora_A.weight``.
        B: (..., out, k) factor, same layout as PEFT's ``lora_B.weight``. Scales and weights are
            folded into the factors: into B for an exact concatenation, split evenly (A = √S·Vᵀ,
            B = U·√S) for a truncated one.
        scale: always 1.0 for results computed here. To save as a PEFT adapter of rank k, write
            ``lora_alpha = k`` (``use_rslora = False``) so that PEFT's alpha/r is 1, or call
            :meth:`rescaled` to match another alpha.
        energy_kept: ‖kept ΔW‖²_F / ‖exact ΔW‖²_F, summed over the batch dims; 1.0 when not truncated
            (and when the exact ΔW is zero).
    """

    A: Tensor
    B: Tensor
    scale: float
    energy_kept: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[-2])

    def delta(self) -> Tensor:
        """The dense ΔW (..., out, in). For tests and small modules only: it is what the rest avoids."""
        return self.scale * (self.B @ self.A)

    def rescaled(self, scale: float) -> LowRankDelta:
        """The same ΔW with ``scale`` as its LoRA scale (e.g. alpha/r of the adapter it will be saved as)."""
        if not math.isfinite(scale) or scale <= 0:
            raise ValidationError(f"a LoRA scale must be a positive finite number, got {scale!r}")
        root = math.sqrt(self.scale / scale)
        return LowRankDelta(self.A * root, self.B * root, float(scale), self.energy_kept)


class FactorSVD(NamedTuple):
    """ΔW = (Q_B·U)·diag(S)·(Q_A·Vhᵀ)ᵀ, the SVD of ΔW kept in factored form.

    qa (..., in, ka) and qb (..., out, kb) have orthonormal columns; u (..., kb, m), s (..., m)
    descending, vh (..., m, ka) is the SVD of the core, m = min(ka, kb) ≤ min(r, in, out).
    """

    qa: Tensor
    ra: Tensor
    qb: Tensor
    u: Tensor
    s: Tensor
    vh: Tensor

    def right_vectors(self, n: int) -> Tensor:
        """Top-n right singular vectors of ΔW as rows, (..., n, in)."""
        return self.vh[..., :n, :] @ self.qa.mT

    def left_vectors(self, n: int) -> Tensor:
        """Top-n left singular vectors of ΔW as columns, (..., out, n)."""
        return self.qb @ self.u[..., :, :n]


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 are upcast: their SVDs are unusable)."""
    for t in tensors:
        if not t.dtype.is_floating_point:
            raise ValidationError(f"LoRA factors must be floating point tensors, got {t.dtype}")
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_module(A: Tensor, B: Tensor, what: str = "module") -> tuple[int, int, int, torch.Size]:
    """Validate one (possibly batched) LoRA module; return (rank, in, out, batch shape)."""
    if A.ndim < 2 or B.ndim < 2:
        raise ValidationError(
            f"{what}: A and B must be at least 2-D, got shapes {tuple(A.shape)}, {tuple(B.shape)}"
        )
    r, n_in = A.shape[-2], A.shape[-1]
    n_out, r_b = B.shape[-2], B.shape[-1]
    if r != r_b:
        raise ValidationError(
            f"{what}: A is (r={r}, in={n_in}) but B is (out={n_out}, r={r_b}); "
            "expected PEFT's layout A (r, in), B (out, r)"
        )
    if A.shape[:-2] != B.shape[:-2]:
        raise ValidationError(f"{what}: batch shapes differ: A {tuple(A.shape)}, B {tuple(B.shape)}")
    if A.device != B.device:
        raise ValidationError(f"{what}: A is on {A.device} but B on {B.device}")
    if r == 0 or n_in == 0 or n_out == 0:
        raise ValidationError(f"{what}: empty factors A {tuple(A.shape)}, B {tuple(B.shape)}")
    return r, n_in, n_out, A.shape[:-2]


def as_scale(scale: Scale, batch: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The scale as a tensor of shape (..., 1, 1), broadcastable against (..., rows, cols)."""
    s = torch.as_tensor(scale, dtype=dtype, device=device)
    if s.ndim > 0 and s.shape != batch:
        raise ValidationError(
            f"scale has shape {tuple(s.shape)}; expected a float or a tensor of shape {tuple(batch)}"
        )
    if not bool(torch.isfinite(s).all()):
        raise ValidationError(f"scale must be finite, got {scale!r}")
    return s[..., None, None]


def factor_svd(A: Tensor, B: Tensor, scale: Scale = 1.0) -> FactorSVD:
    """The exact SVD of ΔW = s·B·A without forming ΔW: Aᵀ = Q_A R_A, B = Q_B R_B, SVD of s·R_B·R_Aᵀ.

    Householder QR keeps Q orthonormal even for rank-deficient or zero factors, so every case has a
    well-defined, deterministic answer; the SVD of the r × r core is where the spectrum lives.
    Inputs must already be in the working dtype (see :func:`work_dtype`).
    """
    _, _, _, batch = check_module(A, B)
    s = as_scale(scale, batch, A.dtype, A.device)
    qa, ra = torch.linalg.qr(A.mT)  # (..., in, ka), (..., ka, r)
    qb, rb = torch.linalg.qr(B)  # (..., out, kb), (..., kb, r)
    core = (rb @ ra.mT) * s  # (..., kb, ka)
    # A non-finite entry anywhere in A or B reaches the small core: checking it is cheap.
    if not bool(torch.isfinite(core).all()):
        raise ValidationError(
            "LoRA factors hold non-finite values (inf or nan); refusing to compute with them"
        )
    u, sv, vh = torch.linalg.svd(core, full_matrices=False)
    return FactorSVD(qa, ra, qb, u, sv, vh)


def fix_sign(vectors: Tensor) -> Tensor:
    """Flip each vector (last dim) so its largest-magnitude entry is positive.

    Ties in magnitude go to the first such index (``torch.argmax`` returns the first maximum), so the
    rule is deterministic; an all-zero vector stays zero.
    """
    idx = vectors.abs().argmax(dim=-1, keepdim=True)
    pivot = torch.gather(vectors, -1, idx)
    return torch.where(pivot < 0, -vectors, vectors)


def truncate(A: Tensor, B: Tensor, rank: int) -> LowRankDelta:
    """Best rank-``rank`` approximation (Eckart–Young) of ΔW = B·A, via :func:`factor_svd`.

    The singular values are split evenly, A' = √S·Vᵀ, B' = U·√S, so both factors have the same norm
    (the balanced gauge). When ΔW has fewer than ``rank`` components the result is padded with zero
    rows/columns: the rank asked for is the rank returned, and ΔW is unchanged by the padding.
    Singular values below the round-off floor eps·max(in, out, r)·‖A‖·‖B‖ do not count as energy, so
    a ΔW that cancels to round-off (an expert minus itself) reports 1.0 rather than a ratio of noise.
    """
    if rank < 1:
        raise ValidationError(f"rank must be at least 1, got {rank}")
    f = factor_svd(A, B, 1.0)
    keep = min(rank, f.s.shape[-1])
    root = f.s[..., :keep].sqrt()
    A2 = root[..., :, None] * f.right_vectors(keep)
    B2 = f.left_vectors(keep) * root[..., None, :]
    if keep < rank:
        A2 = torch.cat([A2, A2.new_zeros(*A2.shape[:-2], rank - keep, A2.shape[-1])], dim=-2)
        B2 = torch.cat([B2, B2.new_zeros(*B2.shape[:-1], rank - keep)], dim=-1)
    # Singular values at round-off level of the inputs (e.g. a residual of an expert minus itself) are
    # noise, not energy: they count as zero, so such a ΔW reports energy_kept 1.0, not a random ratio.
    n_dims = max(A.shape[-1], B.shape[-2], A.shape[-2])
    noise = torch.finfo(A.dtype).eps * n_dims * torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B)
    energy = torch.where(f.s > noise[..., None], f.s, 0).double().square()
    total = float(energy.sum())
    kept = float(energy[..., :keep].sum())
    return LowRankDelta(A2, B2, 1.0, kept / total if total > 0 else 1.0)


def concat_factors(
    terms: Sequence[tuple[Tensor, Tensor, Scale]], weights: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Σ_i w_i·s_i·B_i·A_i exactly, as one pair of factors of rank Σ r_i: [A_1; A_2; …], [w_1 s_1 B_1, …].

    The weights and scales are folded into the B blocks; the A blocks are the inputs, upcast.
    """
    if len(terms) == 0:
        raise ValidationError("nothing to combine: the list of modules is empty")
    if len(weights) != len(terms):
        raise ValidationError(f"{len(weights)} weights for {len(terms)} modules")
    dtype = work_dtype(*(t for A, B, _ in terms for t in (A, B)))
    _, n_in, n_out, batch = check_module(terms[0][0], terms[0][1], "module 0")
    device = terms[0][0].device
    As: list[Tensor] = []
    Bs: list[Tensor] = []
    for i, ((A, B, s), w) in enumerate(zip(terms, weights, strict=True)):
        _, i_in, i_out, i_batch = check_module(A, B, f"module {i}")
        if (i_in, i_out, i_batch) != (n_in, n_out, batch) or A.device != device:
            raise IncompatibleExpertsError(
                f"module {i} has in={i_in}, out={i_out}, batch {tuple(i_batch)} on {A.device}; module 0 has "
                f"in={n_in}, out={n_out}, batch {tuple(batch)} on {device}: only updates of the same "
                "Linear layer can be combined"
            )
        if not math.isfinite(float(w)):
            raise ValidationError(f"weight {i} is not finite: {w!r}")
        As.append(A.to(dtype))
        Bs.append(B.to(dtype) * (as_scale(s, batch, dtype, device) * float(w)))
    return torch.cat(As, dim=-2), torch.cat(Bs, dim=-1)


# --- checks of plain matrices and options (similarity matrices, features, k-means inputs) --------------


def float64_matrix(x: Tensor, name: str) -> Tensor:
    """A finite, non-empty 2-D real tensor as float64 (NaN/inf would silently poison every distance)."""
    if not isinstance(x, Tensor):
        raise ValidationError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValidationError(f"{name} must be a non-empty 2-D tensor, got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValidationError(f"{name} must be real-valued, got dtype {x.dtype}")
    x = x.detach().to(device="cpu", dtype=torch.float64, copy=True)  # callers' tensors are never mutated
    if not bool(torch.isfinite(x).all()):
        raise ValidationError(f"{name} contains NaN or infinite values; fix or drop those experts first")
    return x


def square_matrix(x: Tensor, name: str) -> Tensor:
    x = float64_matrix(x, name)
    if x.shape[0] != x.shape[1]:
        raise ValidationError(f"{name} must be square (n, n), got shape {tuple(x.shape)}")
    return x


def check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValidationError(f"{name} must be an integer, got {value!r}")
    try:
        v = operator.index(value)  # type: ignore[arg-type]  # any object; TypeError is the check
    except TypeError:
        raise ValidationError(f"{name} must be an integer, got {value!r}") from None
    if v < minimum:
        raise ValidationError(f"{name} must be at least {minimum}, got {v}")
    return v


def fix_column_signs(u: Tensor) -> Tensor:
    """Make each column's largest-magnitude entry positive (first one on ties): SVD signs are arbitrary."""
    idx = u.abs().argmax(dim=0)
    s = torch.sign(u[idx, torch.arange(u.shape[1])])
    return u * torch.where(s == 0, torch.ones_like(s), s)
