"""Arrow prototypes of stored experts, computed once and cached in the blob store.

**What is cached, and why it is keyed on the weights alone.** A cache entry is keyed by (expert
weights sha256, method, method version, params_key) and holds the prototypes of the *unscaled*
product B·A. The vectors do not depend on a positive LoRA scale s (ΔW = s·B·A has the right
singular vectors of B·A for every s > 0, and libstore refuses ``lora_alpha`` ≤ 0; PEFT's power
iteration does not scale at all), and the values are those of B·A: :func:`load` multiplies them by
each expert's own s on read. So one entry serves every expert with those weights, whatever its
``lora_alpha``, ``r`` or ``use_rslora``, and each still gets the singular values of its own ΔW.
Renaming an expert keeps its prototypes; changed weights or a new method version miss the cache.
Method version 2 marks this layout: version-1 entries (values of s·B·A for whichever expert came
first) are never read, and the catalog migration ``delta_keys`` deletes them.

Methods: ``exact`` (the top ``top_n`` right singular pairs), ``peft`` (PEFT's power iteration) and
``spectrum`` (every singular pair, min(r, in, out) per module: what SpectR routes with; exact like
``exact``, whose ``top_n`` cannot vary per module).

Only what is missing is computed: every missing expert's tensors are read once, equal-shaped modules
of all of them are stacked and go through one batched call of the math (``libstore.lowrank.
prototypes``), on the GPU when one is available.

Blob format (read by the Hub sync and the router; keep it exactly): one safetensors file per weights
hash holding ``vectors::<module>`` (n, in) float32 and ``values::<module>`` (n,) float32 (of B·A), with
metadata ``{"format": "libstore-prototypes/1", "method", "method_version", "params" (canonical JSON),
"expert_sha256"}``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from libstore.canonical import canonical_json
from libstore.catalog import prototypes as cache
from libstore.errors import IncompatibleExpertsError, IntegrityError, NotFoundError, ValidationError
from libstore.ops.context import Context
from libstore.ops.select import Target, resolve_experts
from libstore.ops.tensors import default_device
from libstore.types import PROTOTYPE_METHODS, Expert, PrototypeMethod, PrototypeSet

if TYPE_CHECKING:
    import torch

    from libstore.lowrank.prototypes import Prototypes
    from libstore.ops.tensors import ModuleFactors

__all__ = [
    "PROTOTYPE_FORMAT",
    "ExpertPrototypes",
    "PrototypeOptions",
    "PrototypeReport",
    "PrototypeSpec",
    "cache_entries",
    "compute",
    "compute_modules",
    "ensure",
    "load",
    "method_spec",
    "read_cached",
    "router_sets",
    "stacked",
]

PROTOTYPE_FORMAT = "libstore-prototypes/1"
TEMP_PREFIX = ".prototypes-"
#: What computing leaves in the library folder while it runs (or after a crash): the file it
#: writes, and ``save_tensors``' own temp file of it (``.<name>.tmp-*``).
TEMP_PREFIXES = (TEMP_PREFIX, f".{TEMP_PREFIX}")
DEFAULT_BATCH_BYTES = 512 << 20  # expert tensors held in memory at once while computing


@dataclass(frozen=True)
class PrototypeOptions:
    """How prototypes are computed (``libstore prototypes compute``, ``Library.compute_prototypes``
    and ``Library.prototypes``): ``exact`` uses ``top_n``; ``peft`` uses ``iters`` and ``seed``;
    ``device`` is where the math runs (default cuda if available)."""

    method: PrototypeMethod = "exact"
    top_n: int = 1
    iters: int = 15
    seed: int = 0
    device: str | None = None

    def spec(self) -> PrototypeSpec:
        return method_spec(self.method, top_n=self.top_n, iters=self.iters, seed=self.seed)


@dataclass(frozen=True)
class PrototypeSpec:
    """A method and its parameters: what a cache entry is keyed on."""

    method: PrototypeMethod
    method_version: int
    params: dict[str, Any]

    @property
    def params_key(self) -> str:
        return cache.params_key(self.params)


def method_spec(
    method: PrototypeMethod = "exact", *, top_n: int = 1, iters: int = 15, seed: int = 0, eps: float = 1e-8
) -> PrototypeSpec:
    """The cache key parts of a method. ``exact`` uses ``top_n``; ``peft`` uses iters, eps and seed."""
    from libstore.lowrank.prototypes import EXACT_METHOD_VERSION, PEFT_METHOD_VERSION

    if method == "exact":
        if int(top_n) < 1:
            raise ValidationError(f"top_n must be at least 1, got {top_n}", field="top_n")
        return PrototypeSpec("exact", EXACT_METHOD_VERSION, {"top_n": int(top_n)})
    if method == "peft":
        if int(top_n) != 1:
            raise ValidationError(
                "the peft method gives one prototype per module (PEFT's power iteration); "
                "use method 'exact' for top_n > 1",
                field="top_n",
            )
        return PrototypeSpec(
            "peft", PEFT_METHOD_VERSION, {"iters": int(iters), "eps": float(eps), "seed": int(seed)}
        )
    if method == "spectrum":
        return PrototypeSpec("spectrum", EXACT_METHOD_VERSION, {})
    raise ValidationError(
        f"unknown prototype method {method!r}; methods are {', '.join(PROTOTYPE_METHODS)}", field="method"
    )


@dataclass(frozen=True)
class ExpertPrototypes:
    """The prototypes of one expert: module -> Prototypes(vectors (n, in), values (n,) of its ΔW)."""

    expert: str
    expert_sha256: str
    method: str
    method_version: int
    params: dict[str, Any]
    modules: dict[str, Prototypes] = field(repr=False)


@dataclass(frozen=True)
class PrototypeReport:
    """What ``compute`` did.

    Attributes:
        computed: experts whose prototypes were computed by this call.
        cached: experts whose prototypes were already cached (nothing computed for them).
        batched_calls: calls of the math function (one per distinct module shape and memory batch).
        device: where the math ran.
    """

    method: str
    method_version: int
    params: dict[str, Any]
    computed: tuple[str, ...] = ()
    cached: tuple[str, ...] = ()
    batched_calls: int = 0
    device: str = "cpu"


# --- computing ---------------------------------------------------------------------------------


def compute(
    ctx: Context,
    target: Target = None,
    *,
    options: PrototypeOptions,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> PrototypeReport:
    """Make sure the prototypes of every expert in ``target`` are cached; compute only what is missing."""
    spec = options.spec()
    experts = resolve_experts(ctx, target)
    return ensure(ctx, experts, spec, default_device(options.device), batch_bytes)


def _cached(ctx: Context, experts: Iterable[Expert], spec: PrototypeSpec) -> dict[str, str]:
    """``weights sha256 -> blob sha256`` of the cached entries of these experts."""
    with ctx.catalog.read() as s:
        return cache.find_cached(
            s,
            (e.sha256 for e in experts),
            method=spec.method,
            method_version=spec.method_version,
            key=spec.params_key,
        )


def _todo(experts: Sequence[Expert], have: Mapping[str, str], spec: PrototypeSpec) -> list[Expert]:
    """One expert per weights hash that is not cached (the first of each)."""
    todo: dict[str, Expert] = {}
    for e in experts:
        if e.sha256 not in have:
            todo.setdefault(e.sha256, e)
    _check_top_n(todo.values(), spec)
    return list(todo.values())


def ensure(
    ctx: Context, experts: Sequence[Expert], spec: PrototypeSpec, device: str, batch_bytes: int
) -> PrototypeReport:
    """Compute and cache what of ``experts`` is missing, reading each missing expert's weights once."""
    from libstore.ops.tensors import load_expert_tensors

    todo = _todo(experts, _cached(ctx, experts, spec), spec)
    ctx.blobs.fetch(e.sha256 for e in todo)
    calls = 0
    for chunk in _chunks(todo, batch_bytes):
        results, n_calls = _compute(chunk, spec, device, lambda e: load_expert_tensors(ctx, e, device=device))
        calls += n_calls
        _store(ctx, results, spec)
    shas = {e.sha256 for e in todo}
    return PrototypeReport(
        method=spec.method,
        method_version=spec.method_version,
        params=dict(spec.params),
        computed=tuple(e.name for e in experts if e.sha256 in shas),
        cached=tuple(e.name for e in experts if e.sha256 not in shas),
        batched_calls=calls,
        device=device,
    )


def router_sets(
    ctx: Context,
    experts: Sequence[Expert],
    spec: PrototypeSpec,
    device: str,
    loaded: Mapping[str, ModuleFactors],
) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """weights sha256 -> module -> (vectors (n, in), values (n,) of B·A) of ``experts``, for a router:
    cached ones read from the cache, missing ones computed on ``device`` from the factors in hand
    (``loaded``: weights sha256 -> factors) and cached once, never read back. The values are those of
    B·A (the cache's layout): the caller scales them by each expert's own s."""
    have = _cached(ctx, experts, spec)
    todo = _todo(experts, have, spec)
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for chunk in _chunks(todo, DEFAULT_BATCH_BYTES):
        results, _ = _compute(chunk, spec, device, lambda e: loaded[e.sha256])
        _store(ctx, results, spec)
        for sha, tensors in results.items():
            out[sha] = {
                k.removeprefix("vectors::"): (v, tensors["values::" + k.removeprefix("vectors::")])
                for k, v in tensors.items()
                if k.startswith("vectors::")
            }
    from libstore.store.safetensors_io import load_tensors

    ctx.blobs.fetch(have[e.sha256] for e in experts if e.sha256 not in out)  # in parallel
    for e in experts:
        if e.sha256 not in out:
            names = [k for m in sorted(e.modules) for k in (f"vectors::{m}", f"values::{m}")]
            t = load_tensors(_checked_blob(ctx, e, have[e.sha256]), names)
            out[e.sha256] = {m: (t[f"vectors::{m}"], t[f"values::{m}"]) for m in sorted(e.modules)}
    return out


def _check_top_n(experts: Iterable[Expert], spec: PrototypeSpec) -> None:
    top_n = spec.params.get("top_n", 1)
    for e in experts:
        for m, sh in e.modules.items():
            limit = min(sh.rank, sh.in_features, sh.out_features)
            if top_n > limit:
                raise ValidationError(
                    f"top_n={top_n} but module {m!r} of expert {e.name!r} has rank {sh.rank}: "
                    f"ΔW has at most {limit} singular vectors there; choose top_n <= {limit}",
                    field="top_n",
                )


def _chunks(experts: list[Expert], budget: int) -> Iterable[list[Expert]]:
    """Groups of experts whose fp32 tensors fit in ``budget`` bytes (at least one expert each)."""
    chunk: list[Expert] = []
    size = 0
    for e in experts:
        b = 4 * sum(sh.rank * (sh.in_features + sh.out_features) for sh in e.modules.values())
        if chunk and size + b > budget:
            yield chunk
            chunk, size = [], 0
        chunk.append(e)
        size += b
    if chunk:
        yield chunk


def compute_modules(
    experts: Sequence[Expert],
    spec: PrototypeSpec,
    device: str,
    factors_of: Callable[[Expert], ModuleFactors],
) -> dict[str, dict[str, Prototypes]]:
    """The prototypes of ``experts`` (weights sha256 -> module -> prototypes of B·A, on CPU), computed
    by the cache's own code and not stored: what ``verify`` compares cached entries with."""
    from libstore.lowrank.prototypes import Prototypes

    results, _ = _compute(experts, spec, device, factors_of)
    out: dict[str, dict[str, Prototypes]] = {}
    for sha, tensors in results.items():
        mods = {k.removeprefix("vectors::") for k in tensors if k.startswith("vectors::")}
        out[sha] = {m: Prototypes(tensors[f"vectors::{m}"], tensors[f"values::{m}"]) for m in mods}
    return out


def _compute(
    experts: Sequence[Expert],
    spec: PrototypeSpec,
    device: str,
    factors_of: Callable[[Expert], ModuleFactors],
) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """The blob tensors of ``experts`` (weights sha256 -> ``vectors::m`` / ``values::m``, of B·A, on
    CPU) and the number of batched calls; computed on ``device``."""
    import torch

    from libstore.lowrank.prototypes import exact_prototypes, peft_prototypes

    # (rank, in, out) -> [(expert sha, module, A, B)]
    groups: dict[tuple[int, int, int], list[tuple[str, str, Any, Any]]] = {}
    for e in experts:
        for m, (a, b) in factors_of(e).items():
            a, b = a.to(device=device, dtype=torch.float32), b.to(device=device, dtype=torch.float32)
            groups.setdefault((a.shape[0], a.shape[1], b.shape[0]), []).append((e.sha256, m, a, b))
    results: dict[str, dict[str, torch.Tensor]] = {e.sha256: {} for e in experts}
    with torch.no_grad():
        for items in groups.values():
            A = torch.stack([it[2] for it in items])
            B = torch.stack([it[3] for it in items])
            if spec.method == "exact":
                p = exact_prototypes(A, B, 1.0, top_n=spec.params["top_n"])
            elif spec.method == "spectrum":
                p = exact_prototypes(A, B, 1.0, top_n=min(A.shape[-2], A.shape[-1], B.shape[-2]))
            else:
                p = peft_prototypes(
                    A, B, 1.0, iters=spec.params["iters"], eps=spec.params["eps"], seed=spec.params["seed"]
                )
            vectors = p.vectors.to("cpu", torch.float32)
            values = p.values.to("cpu", torch.float32)
            for i, (sha, m, *_rest) in enumerate(items):
                results[sha][f"vectors::{m}"] = vectors[i].clone()
                results[sha][f"values::{m}"] = values[i].clone()
    return results, len(groups)


def _store(ctx: Context, results: Mapping[str, Mapping[str, torch.Tensor]], spec: PrototypeSpec) -> None:
    """Write each expert's blob, then record them all in one transaction."""
    blobs = {sha: _store_blob(ctx, sha, tensors, spec) for sha, tensors in results.items()}
    with ctx.catalog.write() as s:
        ctx.blobs.claim_all(ref.sha256 for ref in blobs.values())  # written before: gc may have run
        for sha, ref in blobs.items():
            cache.record(
                s,
                expert_sha256=sha,
                method=spec.method,
                method_version=spec.method_version,
                params=spec.params,
                blob_sha256=ref.sha256,
                blob_size=ref.size,
            )


def _store_blob(ctx: Context, sha: str, tensors: Mapping[str, Any], spec: PrototypeSpec) -> Any:
    from libstore.store.safetensors_io import save_tensors

    meta = {
        "format": PROTOTYPE_FORMAT,
        "method": spec.method,
        "method_version": str(spec.method_version),
        "params": canonical_json(spec.params),
        "expert_sha256": sha,
    }
    tmp = ctx.path / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(6)}.safetensors"
    try:
        save_tensors(dict(sorted(tensors.items())), tmp, metadata=meta)
        return ctx.blobs.put_file(tmp)
    finally:
        tmp.unlink(missing_ok=True)


# --- reading -----------------------------------------------------------------------------------


def load(
    ctx: Context,
    target: Target,
    *,
    options: PrototypeOptions,
    modules: Iterable[str] | None = None,
    compute_missing: bool = True,
) -> dict[str, ExpertPrototypes]:
    """expert name -> its prototypes, computing (and caching) what is missing first. The values are
    those of each expert's own ΔW = s·B·A (the cache holds them for B·A; see the module doc).

    Args:
        modules: only these modules (default: all of each expert's modules).
        compute_missing: ``False`` raises :class:`NotFoundError` for uncached experts instead.
        options.device: where computations run; loaded tensors are on CPU.
    """
    spec = options.spec()
    experts = resolve_experts(ctx, target)
    if compute_missing:
        ensure(ctx, experts, spec, default_device(options.device), DEFAULT_BATCH_BYTES)
    blobs = _cached(ctx, experts, spec)
    ctx.blobs.fetch(blobs.values())  # a team library downloads them in parallel
    wanted = None if modules is None else list(modules)
    out: dict[str, ExpertPrototypes] = {}
    for e in experts:
        if e.sha256 not in blobs:
            raise NotFoundError(
                f"no cached {spec.method} prototypes for {e.name!r}; compute them with: "
                f"libstore prototypes compute {e.name}",
                what="prototype set",
                name=e.name,
            )
        out[e.name] = read_cached(ctx, e, blobs[e.sha256], spec, wanted)
    return out


def _checked_blob(ctx: Context, expert: Expert, blob: str) -> Any:
    """The path of a prototype blob, checked to be a prototype file of ``expert``'s weights."""
    from libstore.store.safetensors_io import read_header

    path = ctx.blobs.path(blob)
    meta = read_header(path).metadata
    if meta.get("format") != PROTOTYPE_FORMAT or meta.get("expert_sha256") != expert.sha256:
        raise IntegrityError(
            f"prototype blob {blob} of {expert.name!r} is not a {PROTOTYPE_FORMAT} file for weights "
            f"{expert.sha256[:12]}; run: libstore verify",
            sha256=blob,
        )
    return path


def read_cached(
    ctx: Context,
    expert: Expert,
    blob: str,
    spec: PrototypeSpec,
    modules: list[str] | None = None,
    *,
    scaled: bool = True,
) -> ExpertPrototypes:
    """The prototypes of ``expert`` stored in cache blob ``blob`` (computed by ``spec``); values at
    the expert's own scale, or as stored (of B·A) with ``scaled=False``."""
    from libstore.lowrank.prototypes import Prototypes
    from libstore.store.safetensors_io import load_tensors

    path = _checked_blob(ctx, expert, blob)
    names = sorted(expert.modules) if modules is None else modules
    unknown = [m for m in names if m not in expert.modules]
    if unknown:
        raise NotFoundError(
            f"expert {expert.name!r} has no LoRA module {unknown[0]!r}; its modules are e.g. "
            f"{', '.join(sorted(expert.modules)[:3])}",
            name=unknown[0],
        )
    t = load_tensors(path, [k for m in names for k in (f"vectors::{m}", f"values::{m}")])
    scale = abs(expert.scale) if scaled else 1.0
    return ExpertPrototypes(
        expert=expert.name,
        expert_sha256=expert.sha256,
        method=spec.method,
        method_version=spec.method_version,
        params=dict(spec.params),
        modules={m: Prototypes(t[f"vectors::{m}"], t[f"values::{m}"] * scale) for m in names},
    )


def stacked(
    ctx: Context,
    experts: Sequence[Expert],
    options: PrototypeOptions | None = None,
) -> dict[str, torch.Tensor]:
    """module -> (E_m, n, in) prototypes of the experts having that module, rows in ``experts`` order,
    on CPU (computed and cached first where missing)."""
    import torch

    loaded = load(ctx, list(experts), options=options or PrototypeOptions())
    rows: dict[str, list[torch.Tensor]] = {}
    for e in experts:
        for m, p in loaded[e.name].modules.items():
            rows.setdefault(m, []).append(p.vectors)
    out: dict[str, torch.Tensor] = {}
    for m, vs in rows.items():
        if len({tuple(v.shape) for v in vs}) != 1:
            raise IncompatibleExpertsError(f"experts' prototypes of {m!r} differ in shape")
        out[m] = torch.stack(vs)
    return out


def cache_entries(ctx: Context) -> list[PrototypeSet]:
    """Every prototype cache entry, with the experts that currently have its weights hash."""
    with ctx.catalog.read() as s:
        return cache.entries(s)
