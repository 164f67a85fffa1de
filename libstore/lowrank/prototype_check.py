"""Is a stored prototype set the prototypes of its weights? The check ``verify`` runs on caches.

A cached set is compared with the prototypes computed afresh from the module's factors at its scale
(exact prototypes cost milliseconds). Results computed on another device or build differ in the last
bits, so the comparison has a tolerance; and where ΔW's top singular values (nearly) repeat, any unit
vector of that singular subspace is a correct exact prototype, so for the ``exact`` method a vector
is also accepted when it is orthonormal to the others and ΔW stretches it by its singular value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from libstore.lowrank.prototypes import Prototypes

__all__ = ["DEFAULT_TOL", "prototype_mismatch"]

DEFAULT_TOL = 1e-3
"""Relative tolerance on singular values and on 1 − |cos| of vectors."""


def prototype_mismatch(
    cached: Prototypes,
    fresh: Prototypes,
    A: Tensor,
    B: Tensor,
    scale: float,
    *,
    exact: bool,
    tol: float = DEFAULT_TOL,
) -> str | None:
    """Why ``cached`` is not (within ``tol``) the prototypes ``fresh`` of ΔW = scale·B·A; None if it is.

    Args:
        cached, fresh: vectors (n, in) and values (n,) of one module.
        A: (r, in) ``lora_A``; B: (out, r) ``lora_B``; scale: the expert's LoRA scale.
        exact: the prototypes are exact singular vectors (the ``exact`` method), so any orthonormal
            basis of a repeated singular value's subspace is accepted too.
    """
    if cached.vectors.shape != fresh.vectors.shape or cached.values.shape != fresh.values.shape:
        return (
            f"shape vectors {list(cached.vectors.shape)} values {list(cached.values.shape)}, expected "
            f"{list(fresh.vectors.shape)} and {list(fresh.values.shape)}"
        )
    v, s = cached.vectors.to(torch.float64), cached.values.to(torch.float64)
    fv, fs = fresh.vectors.to(torch.float64), fresh.values.to(torch.float64)
    if not (bool(torch.isfinite(v).all()) and bool(torch.isfinite(s).all())):
        return "holds NaN or Inf"
    atol = tol * float(fs.abs().max()) if fs.numel() else 0.0
    if not torch.allclose(s, fs, rtol=tol, atol=atol):
        return f"values {_show(s)} but the weights' are {_show(fs)}"
    if bool(((torch.linalg.vector_norm(v, dim=-1) - 1).abs() > tol).any()):
        return "vectors are not of unit length"
    cos = (v * fv).sum(-1).abs()
    if bool((cos >= 1 - tol).all()):
        return None
    if exact and _singular_basis(v, fs, A.to(torch.float64), B.to(torch.float64), scale, tol, atol):
        return None
    return f"vectors are not the weights' (|cos| to them as low as {float(cos.min()):.3f})"


def _singular_basis(
    v: Tensor, values: Tensor, A: Tensor, B: Tensor, scale: float, tol: float, atol: float
) -> bool:
    """Rows of ``v`` are orthonormal and ΔW stretches each by its singular value."""
    n = v.shape[0]
    if not torch.allclose(v @ v.mT, torch.eye(n, dtype=v.dtype), atol=tol):
        return False
    stretch = abs(scale) * torch.linalg.vector_norm(B @ (A @ v.mT), dim=0)
    return torch.allclose(stretch, values, rtol=tol, atol=atol)


def _show(x: Tensor) -> str:
    return "[" + ", ".join(f"{float(t):.4g}" for t in x.flatten()[:4]) + (", ...]" if x.numel() > 4 else "]")
