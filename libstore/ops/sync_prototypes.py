"""Pulled prototype sets are checked to be the prototypes of the pulled weights before they are cached.

A prototype cache entry is shared by every expert with the same weights, so a remote that lists the
wrong vectors (a poisoned cache) would silently change how every such expert is routed. Each pulled
set is therefore recomputed from the expert's factors — exact prototypes cost milliseconds — in the
layout the cache holds (the scale-free prototypes of B·A, see :mod:`libstore.ops.prototypes`; each
expert's scale is applied on read) and compared: the values within a relative 1e-3, each vector
within |cos| 1e-3 of ours; where B·A has repeated top singular values (so any orthonormal basis of
that subspace is right) an exact vector is accepted when it is unit norm, orthogonal to the others
and an eigenvector of (BA)ᵀBA with its value. A set that fails is refused
(:class:`~libstore.errors.IntegrityError`, nothing changes); a set this libstore cannot recompute
(another method or method version) is not taken: it would be recomputed here when needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from libstore.canonical import canonical_json
from libstore.errors import IntegrityError, LibstoreError
from libstore.hub.manifest import PrototypeEntry
from libstore.ops.context import Context
from libstore.types import PROTOTYPE_METHODS, Expert, PrototypeMethod

if TYPE_CHECKING:
    import torch

TOLERANCE = 1e-3


def check_pulled(
    ctx: Context, entries: Sequence[PrototypeEntry], experts: Mapping[str, Expert]
) -> tuple[list[PrototypeEntry], list[str]]:
    """The entries that are right for their experts' weights (their blobs are in the store), and the
    paths of those this libstore cannot check (skipped). Raises :class:`IntegrityError` for a wrong one."""
    from libstore.ops import prototypes as protos

    good, skipped = [], []
    for p in entries:
        ps = p.prototypes
        spec = None
        if ps.method in PROTOTYPE_METHODS:
            method: PrototypeMethod = "exact" if ps.method == "exact" else "peft"
            with contextlib.suppress(LibstoreError, TypeError, ValueError):
                spec = protos.method_spec(method, **_spec_args(ps.params))
        if spec is None or spec.method_version != ps.method_version or spec.params != ps.params:
            skipped.append(p.path)
            continue
        why = _problem(ctx, p, experts[p.expert])
        if why is not None:
            raise IntegrityError(
                f"{p.path} from the remote is not the {ps.method} prototypes of expert {p.expert!r}'s "
                f"weights ({why}); the remote's prototype cache is wrong or poisoned — nothing was "
                f"changed. Pull the experts alone with a remote that is fixed, or ask its owner to run "
                f"`libstore verify --repair` and push again",
                sha256=ps.blob_sha256,
                path=p.path,
            )
        good.append(p)
    return good, skipped


def _spec_args(params: Mapping[str, Any]) -> dict[str, Any]:
    allowed = {"top_n", "iters", "seed", "eps"}
    if not set(params) <= allowed:
        raise ValueError(f"unknown parameters {sorted(set(params) - allowed)}")
    return dict(params)


def _problem(ctx: Context, p: PrototypeEntry, expert: Expert) -> str | None:
    """Why the blob of ``p`` is not the prototypes of ``expert``'s weights, or ``None``."""
    import torch

    from libstore.lowrank.prototypes import exact_prototypes, peft_prototypes
    from libstore.ops.prototypes import PROTOTYPE_FORMAT
    from libstore.ops.tensors import load_expert_tensors
    from libstore.store.safetensors_io import load_tensors, read_header

    ps = p.prototypes
    path = ctx.blobs.path(ps.blob_sha256)
    meta = read_header(path).metadata
    said = {
        "format": PROTOTYPE_FORMAT,
        "method": ps.method,
        "method_version": str(ps.method_version),
        "params": canonical_json(ps.params),
        "expert_sha256": ps.expert_sha256,
    }
    odd = [k for k, v in said.items() if meta.get(k) != v]
    if odd:
        return f"its header says {odd[0]}={meta.get(odd[0])!r:.80}"
    wanted = {f"{kind}::{m}" for m in expert.modules for kind in ("vectors", "values")}
    tensors = load_tensors(path)
    if set(tensors) != wanted:
        extra = sorted(set(tensors) ^ wanted)
        return f"its tensors are not one vectors/values pair per LoRA module (e.g. {extra[0]!r:.80})"
    factors = load_expert_tensors(ctx, expert, dtype=torch.float32)
    scale = 1.0  # the cache's layout: prototypes of B·A, each expert's own scale applied on read
    for m, (a, b) in sorted(factors.items()):
        if ps.method == "exact":
            ours = exact_prototypes(a, b, scale, top_n=int(ps.params["top_n"]))
        else:
            ours = peft_prototypes(
                a,
                b,
                scale,
                iters=int(ps.params["iters"]),
                eps=float(ps.params["eps"]),
                seed=int(ps.params["seed"]),
            )
        why = _compare(a, b, scale, tensors[f"vectors::{m}"], tensors[f"values::{m}"], ours, ps.method)
        if why is not None:
            return f"module {m}: {why}"
    return None


def _compare(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    vectors: torch.Tensor,
    values: torch.Tensor,
    ours: Any,
    method: str,
) -> str | None:
    import torch

    if vectors.shape != ours.vectors.shape or values.shape != ours.values.shape:
        return f"shape {list(vectors.shape)} instead of {list(ours.vectors.shape)}"
    v, s = vectors.to(torch.float64), values.to(torch.float64)
    ov, os_ = ours.vectors.to(torch.float64), ours.values.to(torch.float64)
    if not (torch.isfinite(v).all() and torch.isfinite(s).all()):
        return "it holds NaN or infinite numbers"
    top = float(os_.abs().max()) if os_.numel() else 0.0
    if not torch.allclose(s, os_, rtol=TOLERANCE, atol=TOLERANCE * top + 1e-12):
        return f"singular values {s.tolist()[:3]} instead of {os_.tolist()[:3]}"
    cos = (v * ov).sum(-1).abs() / (v.norm(dim=-1) * ov.norm(dim=-1)).clamp_min(1e-30)
    if bool((cos >= 1 - TOLERANCE).all()):
        return None
    if method != "exact" or top == 0.0:
        return f"vectors differ from the recomputed ones (|cos| down to {float(cos.min()):.4f})"
    # repeated singular values: any orthonormal basis of the subspace is right; check the property
    eye = torch.eye(v.shape[0], dtype=v.dtype)
    if not torch.allclose(v @ v.T, eye, atol=TOLERANCE):
        return "its vectors are not orthonormal"
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    gram_v = (scale**2) * ((b64 @ (a64 @ v.T)).T @ b64 @ a64)  # rows: (ΔWᵀΔW v_i)ᵀ
    residual = (gram_v - (s**2)[:, None] * v).norm(dim=-1)
    if bool((residual <= TOLERANCE * top**2).all()):
        return None
    return "its vectors are not right singular vectors of ΔW for its values"
