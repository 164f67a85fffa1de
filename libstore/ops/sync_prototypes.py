"""Pulled prototype sets are checked to be the prototypes of the pulled weights before they are cached.

A prototype cache entry is shared by every expert with the same weights, so a remote that lists the
wrong vectors (a poisoned cache) would silently change how every such expert is routed. Each pulled
set is therefore recomputed from the expert's factors by the cache's own code — exact prototypes
cost milliseconds — in the layout the cache holds (the scale-free prototypes of B·A, see
:mod:`libstore.ops.prototypes`), and compared the way ``verify`` compares cached sets
(:func:`libstore.lowrank.prototype_check.prototype_mismatch`: values and |cos| of vectors within a
tolerance; for exact prototypes any orthonormal basis of a repeated singular value's subspace is
right). Its header must also say what the manifest says it is. A set that fails is refused
(:class:`~libstore.errors.IntegrityError`, nothing changes); a set this libstore cannot recompute
(another method or method version) is not taken: it would be recomputed here when needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from libstore.canonical import canonical_json
from libstore.errors import IntegrityError, LibstoreError
from libstore.hub.manifest import PrototypeEntry
from libstore.ops.context import Context
from libstore.ops.prototypes import PrototypeSpec, method_spec
from libstore.types import PROTOTYPE_METHODS, Expert, PrototypeMethod


def check_pulled(
    ctx: Context, entries: Sequence[PrototypeEntry], experts: Mapping[str, Expert]
) -> tuple[list[PrototypeEntry], list[str]]:
    """The entries that are right for their experts' weights (their blobs are in the store), and the
    paths of those this libstore cannot check (skipped). Raises :class:`IntegrityError` for a wrong one."""
    good, skipped = [], []
    for p in entries:
        ps = p.prototypes
        spec = None
        if ps.method in PROTOTYPE_METHODS:
            method: PrototypeMethod = "exact" if ps.method == "exact" else "peft"
            with contextlib.suppress(LibstoreError, TypeError, ValueError):
                spec = method_spec(method, **_spec_args(ps.params))
        if spec is None or spec.method_version != ps.method_version or spec.params != ps.params:
            skipped.append(p.path)
            continue
        why = _problem(ctx, p, spec, experts[p.expert])
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


def _problem(ctx: Context, p: PrototypeEntry, spec: PrototypeSpec, expert: Expert) -> str | None:
    """Why the blob of ``p`` is not the prototypes of ``expert``'s weights, or ``None``: its header
    and tensor names, then its numbers against the cache's own computation
    (:func:`libstore.ops.prototypes.compute_modules`) by ``verify``'s comparison
    (:func:`libstore.lowrank.prototype_check.prototype_mismatch`, at scale 1: the cache's layout)."""
    import torch

    from libstore.lowrank.prototype_check import prototype_mismatch
    from libstore.ops.prototypes import PROTOTYPE_FORMAT, compute_modules, read_cached
    from libstore.ops.tensors import load_expert_tensors
    from libstore.store.safetensors_io import read_header

    ps = p.prototypes
    header = read_header(ctx.blobs.path(ps.blob_sha256))
    said = {
        "format": PROTOTYPE_FORMAT,
        "method": ps.method,
        "method_version": str(ps.method_version),
        "params": canonical_json(ps.params),
        "expert_sha256": ps.expert_sha256,
    }
    odd = [k for k, v in said.items() if header.metadata.get(k) != v]
    if odd:
        return f"its header says {odd[0]}={header.metadata.get(odd[0])!r:.80}"
    wanted = {f"{kind}::{m}" for m in expert.modules for kind in ("vectors", "values")}
    if set(header.tensors) != wanted:
        extra = sorted(set(header.tensors) ^ wanted)
        return f"its tensors are not one vectors/values pair per LoRA module (e.g. {extra[0]!r:.80})"
    factors = load_expert_tensors(ctx, expert, dtype=torch.float32)
    cached = read_cached(ctx, expert, ps.blob_sha256, spec, scaled=False).modules
    fresh = compute_modules([expert], spec, "cpu", lambda _e: factors)[expert.sha256]
    for m in sorted(fresh):
        a, b = factors[m]
        why = prototype_mismatch(cached[m], fresh[m], a, b, 1.0, exact=spec.method == "exact")
        if why is not None:
            return f"module {m}: {why}"
    return None
