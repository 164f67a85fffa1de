"""Arrow prototypes: the top right singular vector(s) of each LoRA module's ΔW = s·B·A.

Two methods, both batched over leading dims (equal-shaped experts stack and run in one call):

- ``exact`` (:func:`exact_prototypes`, the default): the exact SVD through thin QR of the factors
  (:func:`libstore.lowrank.factors.factor_svd`), O((in + out)·r²), deterministic, sign fixed.
- ``peft`` (:func:`peft_prototypes`): PEFT's 15-step power iteration, reproduced bit for bit on CPU
  fp32, for comparison with models built by ``peft.create_arrow_model``. It is an approximation that
  has often not converged on real adapters (σ₂/σ₁ of 0.73–0.99), which is why it is not the default.

The method versions are part of the prototype cache key: bump one whenever its results change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from libstore.errors import ValidationError
from libstore.lowrank.factors import Scale, as_scale, check_module, factor_svd, fix_sign, work_dtype

__all__ = [
    "EXACT_METHOD_VERSION",
    "PEFT_METHOD_VERSION",
    "Prototypes",
    "exact_prototypes",
    "peft_prototypes",
]

EXACT_METHOD_VERSION = 2
"""Version of stored :func:`exact_prototypes` results (QR + core SVD, sign rule, ΔW = 0 fallback).
2: stored for scale 1 (the values of B·A; the prototype cache scales them per expert on read)."""

PEFT_METHOD_VERSION = 2
"""Version of stored :func:`peft_prototypes` results (PEFT 0.21's ``top_right_singular_vec_from_BA``).
2: stored for scale 1, as the exact method."""


@dataclass(frozen=True)
class Prototypes:
    """Arrow prototypes of one module, or of a batch of modules.

    Attributes:
        vectors: (..., n, in) right singular vectors of ΔW as rows, unit norm. For the exact method
            the largest-magnitude entry of each is positive (first index on ties); the peft method
            keeps PEFT's sign so that it stays bit-identical (Arrow scores by |⟨h, v⟩| anyway).
        values: (..., n) the matching singular values of ΔW = s·B·A, descending.
    """

    vectors: Tensor
    values: Tensor


def exact_prototypes(A: Tensor, B: Tensor, scale: Scale = 1.0, *, top_n: int = 1) -> Prototypes:
    """The top ``top_n`` right singular vectors and values of ΔW = s·B·A, exactly, without forming ΔW.

    Args:
        A: (..., r, in) ``lora_A`` weights. B: (..., out, r) ``lora_B`` weights.
        scale: alpha/r (alpha/√r for rsLoRA), a float or a tensor of the batch shape. It changes the
            values, not the vectors (unless negative, which only flips signs before the sign rule).
        top_n: how many vectors; 1 ≤ top_n ≤ min(r, in, out), otherwise :class:`ValidationError`:
            beyond the rank the "singular vectors" of ΔW are arbitrary, so they are refused rather
            than silently clamped (which would change the result's shape).

    Edge cases, all deterministic:
        - ΔW = 0 (PEFT initialises B = 0): every unit vector is a right singular vector, so the
          vectors are those of A instead — its top right singular vectors, the directions the adapter
          reads from, which contain ΔW's row space once B is trained — and the values are 0.
        - Rank-deficient A or B: vectors past the rank of ΔW have value 0 and are an orthonormal
          completion inside A's row space.
        - Repeated top singular values: any unit vector of the top singular subspace is correct; the
          one returned is LAPACK's, i.e. deterministic on a given platform.
    """
    r, n_in, n_out, _ = check_module(A, B)
    limit = min(r, n_in, n_out)
    if not 1 <= top_n <= limit:
        raise ValidationError(
            f"top_n={top_n} is outside 1..{limit} = min(r={r}, in={n_in}, out={n_out}): ΔW has no further "
            "well-defined singular vectors"
        )
    dtype = work_dtype(A, B)
    A, B = A.to(dtype), B.to(dtype)
    f = factor_svd(A, B, scale)
    values = f.s[..., :top_n]
    vectors = f.right_vectors(top_n)
    zero = values[..., 0] == 0
    if bool(zero.any()):
        # ΔW = 0: fall back to A's right singular vectors. A = R_Aᵀ·Q_Aᵀ, so they are Q_A·V(R_Aᵀ).
        _, _, vh_a = torch.linalg.svd(f.ra.mT, full_matrices=False)
        fallback = vh_a[..., :top_n, :] @ f.qa.mT
        vectors = torch.where(zero[..., None, None], fallback, vectors)
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=-1, keepdim=True)
    return Prototypes(fix_sign(vectors), values)


def peft_prototypes(
    A: Tensor,
    B: Tensor,
    scale: Scale = 1.0,
    *,
    iters: int = 15,
    eps: float = 1e-8,
    seed: int = 0,
) -> Prototypes:
    """PEFT's Arrow prototype, bit for bit: ``ArrowLoraLinearLayer.top_right_singular_vec_from_BA``.

    What PEFT 0.21 does, per module, and what this repeats op for op (fp32 on CPU is bit-identical;
    other devices follow the same ops):
        - A, B cast to float32; C = Bᵀ·B; **no** LoRA scaling (it cannot change the direction);
        - start vector ``torch.randn(in, generator=g)`` from a fresh ``torch.Generator`` on A's device
          type seeded with ``int(rng_seed)`` — so every module of the same width starts from the same
          vector — normalised as v/(‖v‖ + eps);
        - ``iters`` steps of v ← w/(‖w‖ + eps), w = Aᵀ(C(A·v)); no sign fixing.
    PEFT then stores ``proto.to(A.dtype)``; this returns the fp32 vector (identical for fp32 weights).

    ``seed`` is PEFT's ``ArrowConfig.rng_seed``. PEFT's default ``rng_seed=None`` draws from the
    global RNG and cannot be reproduced; libstore always seeds (default 0).

    ``values`` (not computed by PEFT) are |s|·‖B·A·v‖, the Rayleigh estimate of σ₁ at the returned v.
    """
    if iters < 0:
        raise ValidationError(f"iters must be ≥ 0, got {iters}")
    r, n_in, n_out, batch = check_module(A, B)
    work_dtype(A, B)  # dtype check only: PEFT always iterates in float32
    flat_A = A.reshape(-1, r, n_in)
    flat_B = B.reshape(-1, n_out, r)
    gen = torch.Generator(device=A.device.type)
    gen.manual_seed(int(seed))
    v0 = torch.randn(n_in, dtype=torch.float32, device=A.device, generator=gen)
    v0 = v0 / (v0.norm() + eps)
    protos = []
    for i in range(flat_A.shape[0]):
        A32 = flat_A[i].contiguous().to(torch.float32)
        B32 = flat_B[i].contiguous().to(torch.float32)
        C = B32.T @ B32
        v = v0
        for _ in range(iters):
            w = A32.T @ (C @ (A32 @ v))
            v = w / (w.norm() + eps)
        protos.append(v)
    vectors = torch.stack(protos).reshape(*batch, 1, n_in)
    s = as_scale(scale, batch, torch.float32, A.device)[..., 0]  # (..., 1)
    A32 = A.to(torch.float32)
    B32 = B.to(torch.float32)
    values = torch.linalg.vector_norm(B32 @ (A32 @ vectors.mT), dim=-2) * s.abs()
    if not (bool(torch.isfinite(vectors).all()) and bool(torch.isfinite(values).all())):
        raise ValidationError(
            "LoRA factors hold non-finite values (inf or nan); refusing to compute with them"
        )
    return Prototypes(vectors, values)
