"""Similarity of experts, exact in function space or as the MBC paper's flattened-parameter cosine.

- :func:`frobenius_inner` / :func:`delta_cosine_matrix`: ⟨ΔW₁, ΔW₂⟩_F = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)),
  O((in + out)·r²) per pair and module, never forming ΔW. Gauge-invariant: B·G⁻¹, G·A gives the same
  answer, which flattened parameters do not.
- :func:`flatten_lora` / :func:`flat_cosine_matrix`: the MBC paper's (Ostapenko et al. 2024)
  cosine of the flattened LoRA parameters, for fidelity with its clusterings.

Zero-norm experts (e.g. PEFT's B = 0 initialisation) have no direction: their cosine with every other
expert is defined as 0, and every diagonal entry is 1, so 1 − cos is a proper dissimilarity with a
zero diagonal. Results are fp32 (float64 for float64 inputs), exactly symmetric, clamped to [−1, 1];
sums over modules and chunks accumulate in float64.

**Streaming** (the production path of ``libstore similarity`` and ``libstore cluster``): Gram matrices
add up over modules and over columns, so :func:`delta_similarity` and :func:`flat_similarity` take the
experts' tensors one group of modules at a time (:func:`module_groups` cuts them to a memory budget)
and sum the groups' Gram matrices (:func:`delta_gram_matrix`, :func:`flat_gram`) before one cosine
(:func:`cosine_from_gram`, float64).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from libstore.errors import IncompatibleExpertsError, ValidationError
from libstore.lowrank.factors import Scale, check_module, work_dtype

__all__ = [
    "cosine_from_gram",
    "delta_cosine_matrix",
    "delta_gram_matrix",
    "delta_similarity",
    "flat_cosine_matrix",
    "flat_gram",
    "flat_similarity",
    "flatten_lora",
    "frobenius_inner",
    "module_groups",
]

ModuleFactors = Sequence[tuple[Tensor, Tensor, Scale]]
"""One expert's modules as (A, B, scale), aligned across experts (same modules, same order)."""

# Working-buffer budget of the chunked Gram passes (bytes per Gram block).
_BLOCK_BYTES = 64 * 2**20
# Rows of a Gram block below which matmul runs well below peak on a CPU.
_MIN_BLOCK_ROWS = 512


def frobenius_inner(A1: Tensor, B1: Tensor, s1: Scale, A2: Tensor, B2: Tensor, s2: Scale) -> Tensor:
    """⟨s₁B₁A₁, s₂B₂A₂⟩_F = s₁s₂·tr((B₁ᵀB₂)(A₂A₁ᵀ)), broadcast over leading dims; ranks may differ."""
    check_module(A1, B1, "first module")
    check_module(A2, B2, "second module")
    dtype = work_dtype(A1, B1, A2, B2)
    A1, B1, A2, B2 = (t.to(dtype) for t in (A1, B1, A2, B2))
    if A1.shape[-1] != A2.shape[-1] or B1.shape[-2] != B2.shape[-2]:
        raise IncompatibleExpertsError(
            f"modules of different shapes: ΔW₁ is {B1.shape[-2]}×{A1.shape[-1]}, ΔW₂ "
            f"{B2.shape[-2]}×{A2.shape[-1]}"
        )
    gb = B1.mT @ B2  # (..., r1, r2)
    ga = A1 @ A2.mT  # (..., r1, r2) = (A2 A1ᵀ)ᵀ
    inner = (gb * ga).sum(dim=(-2, -1))
    s = torch.as_tensor(s1, dtype=dtype, device=inner.device) * torch.as_tensor(
        s2, dtype=dtype, device=inner.device
    )
    return inner * s


def delta_gram_matrix(experts: Sequence[ModuleFactors]) -> Tensor:
    """(n, n) float64 Gram matrix Σ_m ⟨ΔW_im, ΔW_jm⟩ of the experts' updates over their modules, on
    the factors' device; exactly symmetric. Each expert is a sequence of per-module (A, B, scale),
    aligned across experts (same module order; the caller sorts by name). Ranks may differ.

    Per module, the n experts' A (padded with zero rows to the largest rank — exact, zero rows add
    nothing) stack into one (n·r, in) matrix X_A, and the s-scaled Bᵀ into X_B (n·r, out). Then
    ⟨ΔW_i, ΔW_j⟩ is the (i, j) block sum of (X_A X_Aᵀ) ⊙ (X_B X_Bᵀ): two big matmuls per module,
    computed in row chunks over the upper block triangle only. Cost n²r²(in + out)/2 per module,
    memory O(n·r·(in + out)) plus a bounded Gram block.
    """
    n = len(experts)
    if n == 0:
        raise ValidationError("no experts to compare")
    n_mod = len(experts[0])
    if n_mod == 0:
        raise ValidationError("expert 0 has no modules")
    for i, e in enumerate(experts):
        if len(e) != n_mod:
            raise IncompatibleExpertsError(
                f"expert {i} has {len(e)} modules but expert 0 has {n_mod}: experts must cover the same "
                f"modules"
            )
    first = experts[0][0][0]
    device = first.device
    dtype = work_dtype(*(t for e in experts for A, B, _ in e for t in (A, B)))
    acc = torch.zeros(n, n, dtype=torch.float64, device=device)
    for m in range(n_mod):
        xa, xb, r = _stack_module([e[m] for e in experts], m, dtype, device)
        _accumulate_block_gram(acc, xa, xb, n, r)
    return torch.triu(acc) + torch.triu(acc, 1).mT


def delta_cosine_matrix(experts: Sequence[ModuleFactors]) -> Tensor:
    """(n, n) cosine of the experts' updates over all their modules, in the factors' working dtype.

    cos(i, j) = Σ_m ⟨ΔW_im, ΔW_jm⟩ / √(Σ_m ‖ΔW_im‖² · Σ_m ‖ΔW_jm‖²), from :func:`delta_gram_matrix`.
    See the module doc for zero-norm experts.
    """
    dtype = work_dtype(*(t for e in experts for A, B, _ in e for t in (A, B)))
    return cosine_from_gram(delta_gram_matrix(experts)).to(dtype)


def delta_similarity(groups: Iterable[Sequence[ModuleFactors]]) -> Tensor:
    """(n, n) float64 cosine of the experts' updates, their modules arriving one group at a time.

    ``groups`` yields, per group of modules, every expert's (A, B, scale) of those modules (as
    :func:`delta_gram_matrix` takes them); the groups' Gram matrices add up to the whole one. A caller
    that reads each group from storage lazily holds one group's factors at a time.
    """
    gram: Tensor | None = None
    for experts in groups:
        g = delta_gram_matrix(experts).to("cpu")
        del experts  # before the next group is read: one group at a time
        gram = g if gram is None else gram + g
    if gram is None:
        raise ValidationError("no modules to compare")
    return cosine_from_gram(gram)


def flatten_lora(modules: Sequence[tuple[Tensor, Tensor]] | Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
    """One expert's LoRA parameters as one fp32 vector: for each module, A.flatten() then B.flatten().

    Module order: the sequence's order, or sorted by name for a mapping (pass a mapping of module
    names to get the same order for every expert). Scales are not applied: the MBC paper flattens the
    raw parameters. mttl stores A transposed ((in, r)); that permutes coordinates the same way for
    every expert, which changes neither cosines nor the rest of MBC (top-k by magnitude, SVD).
    """
    items = [modules[k] for k in sorted(modules)] if isinstance(modules, Mapping) else list(modules)
    if not items:
        raise ValidationError("no modules to flatten")
    dtype = work_dtype(*(t for pair in items for t in pair))
    return torch.cat([t.to(dtype).reshape(-1) for pair in items for t in pair])


def flat_gram(vectors: Tensor) -> Tensor:
    """(n, n) float64 Gram matrix of the rows of ``vectors`` (n, d), chunked over d (fp16/bf16 upcast
    per chunk, so the input is never copied whole), on its device."""
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValidationError(f"expected an (n, d) matrix with n ≥ 1, got shape {tuple(vectors.shape)}")
    dtype = work_dtype(vectors)
    n, d = vectors.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=vectors.device)
    width = max(1, _BLOCK_BYTES // (4 * n))
    for c in range(0, d, width):
        block = vectors[:, c : c + width].to(dtype)
        gram += (block @ block.mT).to(torch.float64)
    return torch.triu(gram) + torch.triu(gram, 1).mT


def flat_cosine_matrix(vectors: Tensor) -> Tensor:
    """(n, n) cosine similarity of the rows of ``vectors`` (n, d), in its working dtype. Zero rows:
    see the module doc."""
    return cosine_from_gram(flat_gram(vectors)).to(work_dtype(vectors))


def flat_similarity(blocks: Iterable[Tensor]) -> Tensor:
    """(n, n) float64 cosine of flattened parameters arriving as column blocks (n, w_b): the rows are
    the blocks side by side. The blocks' Gram matrices add up to the whole one."""
    gram: Tensor | None = None
    for block in blocks:
        g = flat_gram(block).to("cpu")
        del block  # before the next block is read: one block at a time
        gram = g if gram is None else gram + g
    if gram is None:
        raise ValidationError("no parameters to compare")
    return cosine_from_gram(gram)


def module_groups(widths: Mapping[str, int], n: int, budget: int) -> list[list[str]]:
    """Modules in name order, cut into consecutive groups whose n experts' float32 slices (``widths``:
    numbers per expert and module) fit ``budget`` bytes; a module wider than the budget is a group
    of its own."""
    groups: list[list[str]] = [[]]
    used = 0
    for m in sorted(widths):
        size = n * widths[m] * 4
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(m)
        used += size
    return groups


def _stack_module(
    modules: Sequence[tuple[Tensor, Tensor, Scale]], m: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor, int]:
    """X_A (n·r, in) and X_B = (s·B)ᵀ stacked (n·r, out) for one module, ranks zero-padded to the max."""
    shapes = [check_module(A, B, f"module {m} of expert {i}") for i, (A, B, _) in enumerate(modules)]
    r = max(sh[0] for sh in shapes)
    n_in, n_out = shapes[0][1], shapes[0][2]
    n = len(modules)
    xa = torch.zeros(n, r, n_in, dtype=dtype, device=device)
    xb = torch.zeros(n, r, n_out, dtype=dtype, device=device)
    for i, ((A, B, s), (ri, i_in, i_out, batch)) in enumerate(zip(modules, shapes, strict=True)):
        if (i_in, i_out) != (n_in, n_out) or len(batch) != 0:
            raise IncompatibleExpertsError(
                f"module {m} of expert {i} is {i_out}×{i_in} (batch {tuple(batch)}) but expert 0's is "
                f"{n_out}×{n_in}: experts must be aligned module by module, one unbatched module each"
            )
        xa[i, :ri] = A.to(device=device, dtype=dtype)
        xb[i, :ri] = B.to(device=device, dtype=dtype).mT * torch.as_tensor(s, dtype=dtype, device=device)
    return xa.reshape(n * r, n_in), xb.reshape(n * r, n_out), r


def _accumulate_block_gram(acc: Tensor, xa: Tensor, xb: Tensor, n: int, r: int) -> None:
    """acc[i, j] += Σ_ab (X_A X_Aᵀ)[ia, jb]·(X_B X_Bᵀ)[ia, jb] for j ≥ chunk start (upper block triangle)."""
    # ~8 row chunks (the triangle then costs ~56% of the full square), each big enough for BLAS to run at
    # speed, none over the memory budget.
    budget_rows = max(1, _BLOCK_BYTES // (4 * n * r * r))
    rows = max(1, min(n, budget_rows, max(_MIN_BLOCK_ROWS // r, -(-n // 8))))
    for c0 in range(0, n, rows):
        c1 = min(n, c0 + rows)
        ga = xa[c0 * r : c1 * r] @ xa[c0 * r :].mT
        gb = xb[c0 * r : c1 * r] @ xb[c0 * r :].mT
        ga.mul_(gb)
        acc[c0:c1, c0:] += ga.reshape(c1 - c0, r, n - c0, r).sum(dim=(1, 3), dtype=torch.float64)


def cosine_from_gram(gram: Tensor) -> Tensor:
    """Cosine (float64) from a symmetric float64 Gram matrix: zero-norm rows give 0 off-diagonal, 1
    on it; exactly symmetric, clamped to [−1, 1]."""
    if not bool(torch.isfinite(gram).all()):
        raise ValidationError("the parameters hold non-finite values (inf or nan)")
    norms = gram.diagonal().clamp_min(0).sqrt()
    nz = norms > 0
    denom = torch.where(nz, norms, torch.ones_like(norms))
    cos = gram / (denom[:, None] * denom[None, :])  # the product commutes: exactly symmetric
    cos = torch.where(nz[:, None] & nz[None, :], cos, torch.zeros_like(cos)).clamp(-1.0, 1.0)
    cos.fill_diagonal_(1.0)
    return cos
