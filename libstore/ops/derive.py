"""Derived experts: GenKnowSub residuals and merges, their lineage, and what went stale.

A derived expert is an ordinary stored expert (PEFT folder in the blob store, row in the catalog) plus
a derivation record (:class:`libstore.types.Derivation`): method, version, parameters, and each
parent's role, name and weights sha256 at the time. The record's ``inputs_key`` (:func:`inputs_key`:
sha256 over method, version, input parameters and each parent's *ΔW key* — weights sha256 and LoRA
scale, :attr:`libstore.types.Expert.delta_key`) makes a repeated request find the earlier result
instead of computing it again, and never finds the result of another ΔW: two experts with one weights
file and another ``lora_alpha`` get residuals of their own. A child whose parents changed since is
*stale* (``libstore.ops.lineage``), and ``refresh`` recomputes it in place (same name, new files, new
record).

Tensors are computed outside any catalog transaction (files go to the blob store first, which is
harmless if the transaction then fails: ``gc`` collects them); the catalog is written in one short
transaction at the end, all or nothing. Torch is imported only by the functions that compute.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from libstore.canonical import canonical_sha256
from libstore.catalog import derivations as deriv
from libstore.errors import AlreadyExistsError, ValidationError
from libstore.ops.context import Context
from libstore.ops.select import Target, resolve_experts
from libstore.ops.tensors import StagedExpert, check_compatible, read_config, stage_expert
from libstore.store.adapter import validate_name
from libstore.types import GKS_MODES, Derivation, DerivationParent, Expert, GksMode

GKS_METHOD_VERSION = 1
"""Version of the stored GenKnowSub results (bump when the computation changes them)."""
MERGE_METHOD_VERSION = 1
"""Version of the stored merge results."""
DEFAULT_SUFFIX = "_res"
#: What the methods record beside their input parameters (results, not inputs: not in the key).
OUTPUT_PARAMS = ("energy_kept", "energy_kept_min")
#: Parent roles whose order does not matter to a method (sorted in the key).
UNORDERED_ROLES = ("general",)
METHOD_VERSIONS = {
    "gks-param": GKS_METHOD_VERSION,
    "gks-delta": GKS_METHOD_VERSION,
    "merge": MERGE_METHOD_VERSION,
}

Status = Literal["created", "reused", "refreshed"]


@dataclass(frozen=True)
class GksOptions:
    """The options of GenKnowSub (``libstore gks``, ``Library.subtract_general``); see
    :func:`subtract_general` for their meaning."""

    mode: GksMode = "param"
    rank: int | None = None
    suffix: str = DEFAULT_SUFFIX
    refresh: bool = False
    device: str | None = None


@dataclass(frozen=True)
class MergeOptions:
    """The options of a merge (``libstore merge``, ``Library.merge``); see :func:`merge`."""

    rank: int | None = None
    weights: tuple[float, ...] | None = None
    refresh: bool = False
    device: str | None = None


def inputs_key(
    method: str, method_version: int, params: Mapping[str, Any], parents: Sequence[tuple[str, str]]
) -> str:
    """sha256 over method, version, input parameters and ``(role, parent ΔW key)`` pairs.

    Parents keep their order, except those of :data:`UNORDERED_ROLES`, which are sorted after the
    others (the general experts of GenKnowSub: their mean does not depend on their order).
    """
    ordered = [p for p in parents if p[0] not in UNORDERED_ROLES]
    ordered += sorted(p for p in parents if p[0] in UNORDERED_ROLES)
    payload = {
        "method": method,
        "method_version": int(method_version),
        "params": dict(params),
        "parents": [[role, key] for role, key in ordered],
    }
    return canonical_sha256(payload)


# --- results -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GksItem:
    """One residual: the expert it came from, its name, and what this call did."""

    expert: str
    residual: str
    status: Status
    sha256: str
    energy_kept: float | None = None


@dataclass(frozen=True)
class GksReport:
    """What ``subtract_general`` did, per expert, in query order."""

    method: str
    mode: GksMode
    rank: int | None
    general: tuple[str, ...]
    items: tuple[GksItem, ...]

    def _names(self, status: str) -> tuple[str, ...]:
        return tuple(i.residual for i in self.items if i.status == status)

    @property
    def created(self) -> tuple[str, ...]:
        return self._names("created")

    @property
    def reused(self) -> tuple[str, ...]:
        return self._names("reused")

    @property
    def refreshed(self) -> tuple[str, ...]:
        return self._names("refreshed")


# --- GenKnowSub --------------------------------------------------------------------------------


@dataclass
class _Plan:
    expert: Expert
    residual: str
    key: str
    status: Status
    staged: StagedExpert | None = None
    params: dict[str, Any] | None = None
    energy_kept: float | None = None


def subtract_general(
    ctx: Context,
    *,
    general: Target,
    experts: Target,
    options: GksOptions,
) -> GksReport:
    """GenKnowSub: a residual expert per expert, minus the average of the general experts.

    Args (``general``, ``experts``, then the fields of ``options``):
        general: the general-knowledge experts (a query such as ``"kind=general"``, or names).
        experts: the experts to purify (``"kind=task"``); general experts among them are skipped.
        mode: ``param`` (A − mean A_g, B − mean B_g: what PEFT and the paper do; equal ranks; the
            residual keeps the expert's lora_alpha) or ``delta`` (ΔW − mean ΔW_g exactly, at rank
            r + Σ r_g, any ranks).
        rank: delta mode only: truncate each module to this rank by SVD; the energy kept is recorded.
        suffix: residual name = expert name + suffix.
        refresh: recompute, in place, residuals that exist but came from other inputs (a changed
            parent, other general experts or parameters). Without it such residuals are an error.
        device: where the math runs. Default ``cpu``: stored weights then do not depend on the
            machine (GPU kernels round differently), and parameter mode stays bit-identical to PEFT.

    Residuals are stored as kind ``residual`` with the parent's tasks and a derivation record (roles
    ``expert`` and ``general``). A residual computed before from the same inputs is reused as is.
    """
    mode, rank, suffix, refresh, device = (
        options.mode,
        options.rank,
        options.suffix,
        options.refresh,
        options.device,
    )
    if mode not in GKS_MODES:
        raise ValidationError(
            f"unknown GenKnowSub mode {mode!r}; modes are {', '.join(GKS_MODES)}", field="mode"
        )
    if rank is not None:
        if mode != "delta":
            raise ValidationError(
                "--rank truncates delta-mode residuals; parameter mode keeps the expert's rank. "
                "Use --mode delta --rank R",
                field="rank",
            )
        if int(rank) < 1:
            raise ValidationError(f"rank must be at least 1, got {rank}", field="rank")
    method = f"gks-{mode}"
    params: dict[str, Any] = {"mode": mode}
    if mode == "delta":
        params["rank"] = None if rank is None else int(rank)

    gen = resolve_experts(ctx, general, what="general expert")
    gen_names = {g.name for g in gen}
    targets = [e for e in resolve_experts(ctx, experts) if e.name not in gen_names]
    if not targets:
        raise ValidationError("the --experts query matches only general experts; nothing to subtract from")
    check_compatible(
        [*gen, *targets],
        operation="GenKnowSub",
        same_rank=(mode == "param"),
        rank_hint=(
            " (parameter mode averages A and B entrywise); use --mode delta, which is exact "
            "in function space for any ranks"
        ),
    )
    gen_keys = [("general", g.delta_key) for g in gen]
    plans = [_Plan(e, validate_name(f"{e.name}{suffix}"), "", "created") for e in targets]
    for p in plans:
        p.key = inputs_key(method, GKS_METHOD_VERSION, params, [("expert", p.expert.delta_key), *gen_keys])
    outdated: list[str] = []
    with ctx.catalog.read() as s:
        found = deriv.children_by_inputs_key(s, [p.key for p in plans])
        names = [p.residual for p in plans]
        existing = set(deriv.experts_named(s, names))
        derivations = deriv.derivations_of(s, names)
        shas = {n: e.sha256 for n, e in deriv.experts_named(s, found.values()).items()}
    for p in plans:
        if p.key in found:
            p.status, p.residual = "reused", found[p.key]
        elif p.residual in existing:
            d = derivations.get(p.residual)
            if d is None or not d.method.startswith("gks-"):
                raise AlreadyExistsError(
                    f"an expert named {p.residual!r} already exists and is not a GenKnowSub residual; "
                    f"choose another --suffix, or remove or rename it",
                    what="expert",
                    name=p.residual,
                )
            if not refresh:
                outdated.append(p.residual)
            p.status = "refreshed"
    if outdated:
        raise AlreadyExistsError(
            f"residual(s) {', '.join(outdated)} exist but were computed from other inputs (a parent "
            f"changed, or other general experts or parameters); recompute them in place with "
            f"--refresh (Python: refresh=True), or choose another --suffix",
            what="expert",
            name=outdated[0],
        )

    todo = [p for p in plans if p.status != "reused"]
    if todo:
        _compute_residuals(ctx, todo, gen, mode, rank, params, device or "cpu")
        with ctx.catalog.write() as s:
            now = deriv.current_parents(s, [*gen, *(p.expert for p in todo)])
            found = deriv.children_by_inputs_key(s, [p.key for p in todo])
            shas.update({n: e.sha256 for n, e in deriv.experts_named(s, found.values()).items()})
            existing = set(deriv.experts_named(s, [p.residual for p in todo]))
            parents_g = tuple(DerivationParent("general", g.name, g.sha256) for g in gen)
            for p in todo:
                assert p.staged is not None and p.params is not None
                if p.key in found:  # a concurrent run (or an equal ΔW earlier in this one) made it
                    p.status, p.residual = "reused", found[p.key]
                    continue
                if (p.residual in existing) != (p.status == "refreshed"):
                    raise AlreadyExistsError(
                        f"expert {p.residual!r} was added or removed while the residuals were computed; "
                        f"run the command again",
                        what="expert",
                        name=p.residual,
                    )
                parent = now[p.expert.name]
                record = p.staged.expert(
                    name=p.residual,
                    kind="residual",
                    base_model=parent.base_model,
                    tasks=parent.tasks,
                    metadata=_energy_meta(p.energy_kept),
                    source=f"{method}:{parent.name}",
                )
                derivation = Derivation(
                    method=method,
                    method_version=GKS_METHOD_VERSION,
                    params=p.params,
                    inputs_key=p.key,
                    parents=(DerivationParent("expert", parent.name, parent.sha256), *parents_g),
                )
                ctx.blobs.claim_all(f.sha256 for f in p.staged.files)  # staged before: gc may have run
                deriv.save_derived(s, record, derivation, replace=p.status == "refreshed")
                found[p.key] = p.residual
                shas[p.residual] = p.staged.sha256
    return GksReport(
        method=method,
        mode=mode,
        rank=rank,
        general=tuple(g.name for g in gen),
        items=tuple(
            GksItem(
                p.expert.name,
                p.residual,
                p.status,
                shas[p.residual],
                p.energy_kept,
            )
            for p in plans
        ),
    )


def _energy_meta(energy: float | None) -> dict[str, Any]:
    return {} if energy is None else {"energy_kept": energy}


def _compute_residuals(
    ctx: Context,
    plans: Sequence[_Plan],
    gen: Sequence[Expert],
    mode: str,
    rank: int | None,
    params: dict[str, Any],
    device: str,
) -> None:
    """Compute and stage every planned residual (fills ``plan.staged``, ``params``, ``energy_kept``)."""
    import torch

    from libstore.lowrank.gks import subtract_general_delta, subtract_general_param
    from libstore.ops.tensors import load_expert_tensors

    ctx.blobs.fetch(e.sha256 for e in [*gen, *(p.expert for p in plans)])
    gen_t = [load_expert_tensors(ctx, g, device=device, dtype=torch.float32) for g in gen]
    with torch.no_grad():
        for p in plans:
            e = p.expert
            t = load_expert_tensors(ctx, e, device=device, dtype=torch.float32)
            if mode == "param":
                out = {
                    m: subtract_general_param(a, b, [g[m][0] for g in gen_t], [g[m][1] for g in gen_t])
                    for m, (a, b) in t.items()
                }
                p.staged = stage_expert(
                    ctx,
                    modules=out,
                    rank=e.rank,
                    alpha=e.alpha,
                    use_rslora=e.use_rslora,
                    template_config=read_config(ctx, e),
                )
                p.params = dict(params)
                continue
            general = [
                [(g[m][0], g[m][1], ge.scale) for g, ge in zip(gen_t, gen, strict=True)] for m in sorted(t)
            ]
            deltas = {
                m: subtract_general_delta(a, b, e.scale, general[i], rank=None)
                for i, (m, (a, b)) in enumerate(sorted(t.items()))
            }
            out, energy = _truncated(deltas, rank)
            r_out = next(iter(out.values()))[0].shape[0]
            p.staged = stage_expert(
                ctx,
                modules=out,
                rank=r_out,
                alpha=r_out,
                use_rslora=False,
                template_config=read_config(ctx, e),
            )
            p.energy_kept = energy[0]
            p.params = {**params, "energy_kept": energy[0], "energy_kept_min": energy[1]}


def _truncated(deltas: dict[str, Any], rank: int | None) -> tuple[dict[str, Any], tuple[float, float]]:
    """Truncate exact low-rank deltas to ``rank`` (if given); energy kept overall and worst module."""
    from libstore.lowrank.factors import truncate
    from libstore.lowrank.similarity import frobenius_inner

    out: dict[str, Any] = {}
    kept_sum = total_sum = 0.0
    worst = 1.0
    for m, d in deltas.items():
        assert d.scale == 1.0
        if rank is None:
            out[m] = (d.A, d.B)
            continue
        total = float(frobenius_inner(d.A, d.B, 1.0, d.A, d.B, 1.0))
        t = truncate(d.A, d.B, rank)
        out[m] = (t.A, t.B)
        kept_sum += t.energy_kept * total
        total_sum += total
        worst = min(worst, t.energy_kept)
    overall = kept_sum / total_sum if total_sum > 0 else 1.0
    return out, (_round(overall), _round(worst))


def _round(x: float) -> float:
    return float(f"{x:.6g}") if math.isfinite(x) else x


# --- merge -------------------------------------------------------------------------------------


def merge(
    ctx: Context,
    names: Sequence[str],
    *,
    name: str,
    options: MergeOptions,
) -> Expert:
    """Average experts in ΔW space (optionally weighted) into a new expert ``name`` of kind ``merged``.

    ΔW = Σ_i w_i·ΔW_i (w_i = 1/n by default) is re-factorised exactly at rank Σ r_i, or truncated to
    ``rank`` by SVD (the energy kept is recorded in the derivation parameters and the metadata).
    Asking again for the same merge under the same name returns the stored one; ``refresh``
    recomputes an existing merge of that name whose inputs changed. ``device`` defaults to ``cpu``
    (see :func:`subtract_general`).
    """
    rank, weights, refresh, device = options.rank, options.weights, options.refresh, options.device
    names = list(names)
    if not names:
        raise ValidationError("merge needs at least one expert")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValidationError(f"expert {dupes[0]!r} is listed twice; pass weights instead")
    validate_name(name)
    if name in names:
        raise ValidationError(f"the merged expert cannot replace its input {name!r}; choose another --name")
    if weights is None:
        w = [1.0 / len(names)] * len(names)
    else:
        w = [float(x) for x in weights]
        if len(w) != len(names):
            raise ValidationError(
                f"{len(w)} weights for {len(names)} experts; give one weight per expert", field="weights"
            )
        if not all(math.isfinite(x) for x in w):
            raise ValidationError(f"weights must be finite numbers, got {list(weights)}", field="weights")
    if rank is not None and int(rank) < 1:
        raise ValidationError(f"rank must be at least 1, got {rank}", field="rank")
    experts = resolve_experts(ctx, names)
    check_compatible(experts, operation="merge")
    params: dict[str, Any] = {"weights": w, "rank": None if rank is None else int(rank)}
    key = inputs_key("merge", MERGE_METHOD_VERSION, params, [("expert", e.delta_key) for e in experts])

    with ctx.catalog.read() as s:
        existing = deriv.experts_named(s, [name]).get(name)
        d = deriv.derivations_of(s, [name]).get(name)
    if existing is not None:
        if d is not None and d.inputs_key == key:
            return dataclasses.replace(existing, lineage=d)
        if d is None or d.method != "merge":
            raise AlreadyExistsError(
                f"an expert named {name!r} already exists and is not a merge; choose another --name",
                what="expert",
                name=name,
            )
        if not refresh:
            raise AlreadyExistsError(
                f"merge {name!r} exists but was computed from other inputs (a parent changed, or "
                f"other experts, weights or rank); recompute it in place with --refresh "
                f"(Python: refresh=True), or choose another --name",
                what="expert",
                name=name,
            )

    staged, energy = _compute_merge(ctx, experts, w, rank, device or "cpu")
    recorded = {**params, "energy_kept": energy[0], "energy_kept_min": energy[1]}
    with ctx.catalog.write() as s:
        now = deriv.current_parents(s, experts)
        exists_now = name in deriv.experts_named(s, [name])
        if exists_now and existing is None:
            raise AlreadyExistsError(
                f"an expert named {name!r} was added while the merge was computed; run it again",
                what="expert",
                name=name,
            )
        record = staged.expert(
            name=name,
            kind="merged",
            base_model=experts[0].base_model,
            tasks=sorted({t for e in experts for t in now[e.name].tasks}),
            metadata=_energy_meta(energy[0] if rank is not None else None),
            source="merge:" + ",".join(names),
        )
        derivation = Derivation(
            method="merge",
            method_version=MERGE_METHOD_VERSION,
            params=recorded,
            inputs_key=key,
            parents=tuple(DerivationParent("expert", e.name, e.sha256) for e in experts),
        )
        ctx.blobs.claim_all(f.sha256 for f in staged.files)  # staged before: gc may have run
        return deriv.save_derived(s, record, derivation, replace=exists_now)


def _compute_merge(
    ctx: Context, experts: Sequence[Expert], weights: Sequence[float], rank: int | None, device: str
) -> tuple[StagedExpert, tuple[float, float]]:
    import torch

    from libstore.lowrank.merge import merge_delta
    from libstore.ops.tensors import load_expert_tensors

    ctx.blobs.fetch(e.sha256 for e in experts)
    tensors = [load_expert_tensors(ctx, e, device=device, dtype=torch.float32) for e in experts]
    modules = sorted(experts[0].modules)
    with torch.no_grad():
        deltas = {
            m: merge_delta(
                [(t[m][0], t[m][1], e.scale) for t, e in zip(tensors, experts, strict=True)],
                weights=weights,
                rank=None,
            )
            for m in modules
        }
        out, energy = _truncated(deltas, rank)
    r_out = next(iter(out.values()))[0].shape[0]
    staged = stage_expert(
        ctx,
        modules=out,
        rank=r_out,
        alpha=r_out,
        use_rslora=False,
        template_config=read_config(ctx, experts[0]),
    )
    return staged, energy
