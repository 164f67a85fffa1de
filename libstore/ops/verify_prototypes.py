"""``verify``'s check of the prototype cache: is each entry's blob the prototypes of its weights?

A cache entry is keyed by the weights' hash and reused by every expert with those weights, so a
wrong one (bad bytes of the right format, stored under the right hash — from a remote that lies, or a
bug) poisons every router built over them. Exact prototypes cost milliseconds, so verify recomputes
each live entry with the cache's own code (:func:`libstore.ops.prototypes.compute_modules`, on CPU)
from the factors of an expert that has those weights and compares
(:func:`libstore.lowrank.prototype_check.prototype_mismatch`). The cache holds the prototypes of the
unscaled B·A (one entry serves every scale), so one expert per entry is enough and the comparison is
at scale 1. Entries of an older method version than
this libstore computes are not recomputed (nothing reads them any more).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, get_args

from libstore.catalog.maintenance import CatalogSnapshot
from libstore.errors import LibstoreError
from libstore.ops.context import Context
from libstore.ops.problems import BadPrototypeCache, Problem
from libstore.ops.prototypes import PROTOTYPE_FORMAT, PrototypeSpec, method_spec
from libstore.store.safetensors_io import read_header
from libstore.types import Expert, PrototypeMethod, PrototypeSet

if TYPE_CHECKING:
    from libstore.lowrank.prototypes import Prototypes
    from libstore.ops.tensors import ModuleFactors


def check_prototypes(ctx: Context, cat: CatalogSnapshot, good: set[str]) -> list[Problem]:
    """Problems of the cache entries whose blobs hash right (the others are reported as blobs)."""
    out: list[Problem] = []
    sound: list[PrototypeSet] = []
    for c in cat.caches:
        if c.blob_sha256 not in good:
            continue
        reason = _format_problem(ctx, c)
        if reason is None:
            sound.append(c)
        else:
            out.append(BadPrototypeCache(c.expert_sha256, c.method, c.blob_sha256, reason))
    by_name = {e.name: e for e in cat.experts}
    todo = []
    for c in sound:
        spec = _current_spec(c)
        experts = [by_name[n] for n in c.experts if n in by_name and by_name[n].sha256 in good]
        if spec is not None and experts:
            todo.append((c, spec, experts[:1]))
    if todo:
        out.extend(_check_values(ctx, todo))
    return out


def _format_problem(ctx: Context, c: PrototypeSet) -> str | None:
    """Why the blob is not a prototype file made for this entry's weights and method, or None."""
    try:
        meta = read_header(ctx.blobs.path(c.blob_sha256)).metadata
    except LibstoreError as err:
        return f"unreadable ({str(err)[:120]})"
    except FileNotFoundError:
        return None  # removed since it was hashed: reported as missing if still referenced
    if meta.get("format") != PROTOTYPE_FORMAT:
        return f"format {meta.get('format')!r}, not {PROTOTYPE_FORMAT!r}"
    if meta.get("expert_sha256") != c.expert_sha256:
        return f"made for weights {str(meta.get('expert_sha256'))[:12]}"
    if meta.get("method") != c.method:
        return f"made by method {meta.get('method')!r}"
    return None


def _current_spec(c: PrototypeSet) -> PrototypeSpec | None:
    """The entry's method and parameters, if this libstore computes that method version."""
    method = next((m for m in get_args(PrototypeMethod) if m == c.method), None)
    if method is None:
        return None
    current = method_spec(method).method_version
    return PrototypeSpec(method, c.method_version, dict(c.params)) if c.method_version == current else None


def _check_values(
    ctx: Context, todo: list[tuple[PrototypeSet, PrototypeSpec, list[Expert]]]
) -> list[Problem]:
    import torch

    from libstore.ops.prototypes import compute_modules, read_cached
    from libstore.ops.tensors import load_expert_tensors

    out: list[Problem] = []
    for c, spec, experts in todo:
        for e in experts:
            try:
                factors = load_expert_tensors(ctx, e, dtype=torch.float32)
                cached = read_cached(ctx, e, c.blob_sha256, spec, scaled=False).modules
            except FileNotFoundError:
                continue  # removed since it was hashed: reported as missing if still referenced
            except LibstoreError as err:
                out.append(BadPrototypeCache(c.expert_sha256, c.method, c.blob_sha256, str(err)[:200]))
                break
            fresh = compute_modules([e], spec, "cpu", _fixed(factors))[e.sha256]
            reason = _first_mismatch(cached, fresh, factors, 1.0, exact=spec.method == "exact")
            if reason is not None:
                out.append(
                    BadPrototypeCache(
                        c.expert_sha256,
                        c.method,
                        c.blob_sha256,
                        f"not the prototypes of its weights: {reason}",
                    )
                )
                break
    return out


def _fixed(factors: ModuleFactors) -> Callable[[Expert], ModuleFactors]:
    """``factors_of`` for one expert whose factors are already loaded."""
    return lambda _e: factors


def _first_mismatch(
    cached: Mapping[str, Prototypes],
    fresh: Mapping[str, Prototypes],
    factors: ModuleFactors,
    scale: float,
    *,
    exact: bool,
) -> str | None:
    """The first module whose cached prototypes are not the fresh ones, and why."""
    from libstore.lowrank.prototype_check import prototype_mismatch

    for m in sorted(fresh):
        if m not in cached:
            return f"module {m} is missing"
        a, b = factors[m]
        why = prototype_mismatch(cached[m], fresh[m], a, b, scale, exact=exact)
        if why is not None:
            return f"module {m}: {why}"
    return None
