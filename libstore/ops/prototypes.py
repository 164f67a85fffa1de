"""Arrow prototypes of stored experts, computed once and cached in the blob store.

A cache entry is keyed by (expert weights sha256, method, method version, params_key), so renaming an
expert keeps its prototypes, changed weights or a new method version miss the cache, and two experts
with the same weights share one entry. Only what is missing is computed: every missing expert's
tensors are read once, equal-shaped modules of all of them are stacked and go through one batched call
of the math (``libstore.lowrank.prototypes``), on the GPU when one is available.

Blob format (read by the Hub sync and the router; keep it exactly): one safetensors file per expert
holding ``vectors::<module>`` (n, in) float32 and ``values::<module>`` (n,) float32, with metadata
``{"format": "libstore-prototypes/1", "method", "method_version", "params" (canonical JSON),
"expert_sha256"}``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from libstore.canonical import canonical_json
from libstore.catalog import prototypes as cache
from libstore.catalog import repo
from libstore.errors import (
    IncompatibleExpertsError,
    IntegrityError,
    NotFoundError,
    ValidationError,
)
from libstore.ops.context import Context
from libstore.ops.query import parse_query
from libstore.types import Expert, ExpertQuery

if TYPE_CHECKING:
    import torch

    from libstore.lowrank.prototypes import Prototypes
    from libstore.ops.tensors import ModuleFactors

PROTOTYPE_FORMAT = "libstore-prototypes/1"
TEMP_PREFIX = ".prototypes-"
#: What computing leaves in the library folder while it runs (or after a crash): the file it
#: writes, and ``save_tensors``' own temp file of it (``.<name>.tmp-*``).
TEMP_PREFIXES = (TEMP_PREFIX, f".{TEMP_PREFIX}")
METHODS = ("exact", "peft")
Method = Literal["exact", "peft"]
DEFAULT_BATCH_BYTES = 512 << 20  # expert tensors held in memory at once while computing

Target = str | ExpertQuery | Expert | Sequence[str | Expert] | None


@dataclass(frozen=True)
class PrototypeSpec:
    """A method and its parameters: what a cache entry is keyed on."""

    method: str
    method_version: int
    params: dict[str, Any]

    @property
    def params_key(self) -> str:
        return cache.params_key(self.params)


def method_spec(
    method: str = "exact", *, top_n: int = 1, iters: int = 15, seed: int = 0, eps: float = 1e-8
) -> PrototypeSpec:
    """The cache key parts of a method. ``exact`` uses ``top_n``; ``peft`` uses iters, eps and seed."""
    from libstore.lowrank.prototypes import EXACT_METHOD_VERSION, PEFT_METHOD_VERSION

    if method == "exact":
        if int(top_n) < 1:
            raise ValidationError(f"top_n must be at least 1, got {top_n}")
        return PrototypeSpec("exact", EXACT_METHOD_VERSION, {"top_n": int(top_n)})
    if method == "peft":
        if int(top_n) != 1:
            raise ValidationError(
                "the peft method gives one prototype per module (PEFT's power iteration); "
                "use method 'exact' for top_n > 1"
            )
        return PrototypeSpec(
            "peft", PEFT_METHOD_VERSION, {"iters": int(iters), "eps": float(eps), "seed": int(seed)}
        )
    raise ValidationError(f"unknown prototype method {method!r}; methods are {', '.join(METHODS)}")


@dataclass(frozen=True)
class ExpertPrototypes:
    """The cached prototypes of one expert: module -> Prototypes(vectors (n, in), values (n,))."""

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


def default_device(device: str | None = None) -> str:
    """``device`` if given, else ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_experts(ctx: Context, target: Target) -> list[Expert]:
    """Experts named by a query string, an ``ExpertQuery``, an ``Expert`` or a list of names/Experts.

    A query that matches nothing raises :class:`NotFoundError` (so does an unknown name in a list).
    """
    if isinstance(target, Expert):
        return [target]
    if target is None or isinstance(target, str | ExpertQuery):
        q = parse_query(target)
        with ctx.catalog.read() as s:
            experts = [repo.to_expert(s, r, with_lineage=False) for r in repo.find_expert_rows(s, q)]
        shown = target if isinstance(target, str) else "the query"
        if not experts:
            raise NotFoundError(f"no expert matches {shown!r}; list them with: libstore ls")
        found = {e.name for e in experts}
        missing = [n for n in q.names if "*" not in n and "?" not in n and n not in found]
        if missing:  # a name asked for explicitly must not drop out silently
            raise NotFoundError(
                f"no expert named {missing[0]!r} matches {shown!r}; list them with: libstore ls"
            )
        return experts
    with ctx.catalog.read() as s:
        return [
            item if isinstance(item, Expert) else repo.to_expert(s, repo.expert_row(s, item))
            for item in target
        ]


# --- computing ---------------------------------------------------------------------------------


def compute(
    ctx: Context,
    target: Target = None,
    *,
    method: str = "exact",
    top_n: int = 1,
    iters: int = 15,
    seed: int = 0,
    device: str | None = None,
    batch_bytes: int = DEFAULT_BATCH_BYTES,
) -> PrototypeReport:
    """Make sure the prototypes of every expert in ``target`` are cached; compute only what is missing."""
    spec = method_spec(method, top_n=top_n, iters=iters, seed=seed)
    experts = resolve_experts(ctx, target)
    return ensure(ctx, experts, spec, default_device(device), batch_bytes)


def ensure(
    ctx: Context,
    experts: Sequence[Expert],
    spec: PrototypeSpec,
    device: str,
    batch_bytes: int,
    preloaded: Mapping[str, ModuleFactors] | None = None,
) -> PrototypeReport:
    """Compute and cache what of ``experts`` is missing; ``preloaded`` spares re-reading blobs."""
    with ctx.catalog.read() as s:
        have = cache.find_cached(
            s,
            (e.sha256 for e in experts),
            method=spec.method,
            method_version=spec.method_version,
            key=spec.params_key,
        )
    todo: dict[str, Expert] = {}
    for e in experts:
        if e.sha256 not in have:
            todo.setdefault(e.sha256, e)
    _check_top_n(todo.values(), spec)
    calls = 0
    for chunk in _chunks(list(todo.values()), batch_bytes):
        blobs, n_calls = _compute_chunk(ctx, chunk, spec, device, preloaded)
        calls += n_calls
        with ctx.catalog.write() as s:
            ctx.blobs.claim_all(ref.sha256 for ref in blobs.values())
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
    return PrototypeReport(
        method=spec.method,
        method_version=spec.method_version,
        params=dict(spec.params),
        computed=tuple(e.name for e in experts if e.sha256 in todo),
        cached=tuple(e.name for e in experts if e.sha256 not in todo),
        batched_calls=calls,
        device=device,
    )


def _check_top_n(experts: Iterable[Expert], spec: PrototypeSpec) -> None:
    top_n = spec.params.get("top_n", 1)
    for e in experts:
        for m, sh in e.modules.items():
            limit = min(sh.rank, sh.in_features, sh.out_features)
            if top_n > limit:
                raise ValidationError(
                    f"top_n={top_n} but module {m!r} of expert {e.name!r} has rank {sh.rank}: "
                    f"ΔW has at most {limit} singular vectors there; choose top_n <= {limit}"
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


def _compute_chunk(
    ctx: Context,
    experts: Sequence[Expert],
    spec: PrototypeSpec,
    device: str,
    preloaded: Mapping[str, ModuleFactors] | None = None,
) -> tuple[dict[str, Any], int]:
    """Compute and store the prototypes of ``experts``; returns sha256 -> BlobRef and the call count."""
    results, calls = compute_modules(ctx, experts, spec, device, preloaded)
    return {sha: _store_blob(ctx, sha, modules, spec) for sha, modules in results.items()}, calls


def compute_modules(
    ctx: Context,
    experts: Sequence[Expert],
    spec: PrototypeSpec,
    device: str,
    preloaded: Mapping[str, ModuleFactors] | None = None,
) -> tuple[dict[str, dict[str, Prototypes]], int]:
    """The prototypes of ``experts`` (sha256 -> module -> Prototypes on CPU), not stored; and the
    number of batched calls of the math.

    ``preloaded`` (expert sha256 -> factors) lets a caller that already read the weights (the router
    builder, ``verify``) avoid reading a blob twice.
    """
    import torch

    from libstore.lowrank.prototypes import Prototypes, exact_prototypes, peft_prototypes
    from libstore.ops.tensors import load_expert_tensors

    # (rank, in, out) -> [(expert sha, module, A, B, scale)]
    groups: dict[tuple[int, int, int], list[tuple[str, str, Any, Any, float]]] = {}
    for e in experts:
        factors = (preloaded or {}).get(e.sha256)
        if factors is None:
            factors = load_expert_tensors(ctx, e, device=device)
        for m, (a, b) in factors.items():
            a, b = a.to(device=device, dtype=torch.float32), b.to(device=device, dtype=torch.float32)
            key = (a.shape[0], a.shape[1], b.shape[0])
            groups.setdefault(key, []).append((e.sha256, m, a, b, e.scale))
    results: dict[str, dict[str, Prototypes]] = {e.sha256: {} for e in experts}
    calls = 0
    with torch.no_grad():
        for items in groups.values():
            A = torch.stack([it[2] for it in items])
            B = torch.stack([it[3] for it in items])
            scale = torch.tensor([it[4] for it in items], dtype=torch.float32, device=A.device)
            if spec.method == "exact":
                p = exact_prototypes(A, B, scale, top_n=spec.params["top_n"])
            else:
                p = peft_prototypes(
                    A, B, scale, iters=spec.params["iters"], eps=spec.params["eps"], seed=spec.params["seed"]
                )
            calls += 1
            vectors = p.vectors.to("cpu", torch.float32)
            values = p.values.to("cpu", torch.float32)
            for i, (sha, m, *_rest) in enumerate(items):
                results[sha][m] = Prototypes(vectors[i].clone(), values[i].clone())
    return results, calls


def _store_blob(ctx: Context, sha: str, modules: dict[str, Prototypes], spec: PrototypeSpec) -> Any:
    from libstore.store.safetensors_io import save_tensors

    tensors = {f"vectors::{m}": p.vectors for m, p in modules.items()}
    tensors.update({f"values::{m}": p.values for m, p in modules.items()})
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
    method: str = "exact",
    top_n: int = 1,
    iters: int = 15,
    seed: int = 0,
    device: str | None = None,
    modules: Iterable[str] | None = None,
    compute_missing: bool = True,
) -> dict[str, ExpertPrototypes]:
    """expert name -> its prototypes, computing (and caching) what is missing first.

    Args:
        modules: only these modules (default: all of each expert's modules).
        compute_missing: ``False`` raises :class:`NotFoundError` for uncached experts instead.
        device: where computations run; loaded tensors are on CPU.
    """
    spec = method_spec(method, top_n=top_n, iters=iters, seed=seed)
    experts = resolve_experts(ctx, target)
    if compute_missing:
        ensure(ctx, experts, spec, default_device(device), DEFAULT_BATCH_BYTES)
    with ctx.catalog.read() as s:
        blobs = cache.find_cached(
            s,
            (e.sha256 for e in experts),
            method=spec.method,
            method_version=spec.method_version,
            key=spec.params_key,
        )
    wanted = None if modules is None else list(modules)
    out: dict[str, ExpertPrototypes] = {}
    for e in experts:
        if e.sha256 not in blobs:
            raise NotFoundError(
                f"no cached {spec.method} prototypes for {e.name!r}; compute them with: "
                f"libstore prototypes compute {e.name}"
            )
        out[e.name] = read_cached(ctx, e, blobs[e.sha256], spec, wanted)
    return out


def read_cached(
    ctx: Context, expert: Expert, blob: str, spec: PrototypeSpec, modules: list[str] | None = None
) -> ExpertPrototypes:
    """The prototypes of ``expert`` stored in cache blob ``blob`` (computed by ``spec``)."""
    from libstore.lowrank.prototypes import Prototypes
    from libstore.store.safetensors_io import load_tensors, read_header

    path = ctx.blobs.path(blob)
    meta = read_header(path).metadata
    if meta.get("format") != PROTOTYPE_FORMAT or meta.get("expert_sha256") != expert.sha256:
        raise IntegrityError(
            f"prototype blob {blob} of {expert.name!r} is not a {PROTOTYPE_FORMAT} file for weights "
            f"{expert.sha256[:12]}; run: libstore verify"
        )
    names = sorted(expert.modules) if modules is None else modules
    unknown = [m for m in names if m not in expert.modules]
    if unknown:
        raise NotFoundError(
            f"expert {expert.name!r} has no LoRA module {unknown[0]!r}; its modules are e.g. "
            f"{', '.join(sorted(expert.modules)[:3])}"
        )
    t = load_tensors(path, [k for m in names for k in (f"vectors::{m}", f"values::{m}")])
    return ExpertPrototypes(
        expert=expert.name,
        expert_sha256=expert.sha256,
        method=spec.method,
        method_version=spec.method_version,
        params=dict(spec.params),
        modules={m: Prototypes(t[f"vectors::{m}"], t[f"values::{m}"]) for m in names},
    )


def stacked(
    ctx: Context,
    experts: Sequence[Expert],
    *,
    method: str = "exact",
    top_n: int = 1,
    iters: int = 15,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, torch.Tensor]:
    """module -> (E_m, n, in) prototypes of the experts having that module, rows in ``experts`` order.

    For the router: cached prototypes of a list of experts, stacked per module, on CPU.
    """
    import torch

    loaded = load(ctx, list(experts), method=method, top_n=top_n, iters=iters, seed=seed, device=device)
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


def cache_entries(ctx: Context) -> list[cache.CacheEntry]:
    """Every prototype cache entry, with the experts that currently have its weights hash."""
    with ctx.catalog.read() as s:
        return cache.entries(s)
