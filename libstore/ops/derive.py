"""Derived experts: GenKnowSub residuals and merges, their lineage, and what went stale.

A derived expert is an ordinary stored expert (PEFT folder in the blob store, row in the catalog) plus
a derivation record: method, version, parameters, and each parent's role and sha256 at the time. The
record's ``inputs_key`` (sha256 over method, version, input parameters and parents' hashes) makes a
repeated request find the earlier result instead of computing it again; a parent whose current hash
differs from the recorded one (or that is gone) makes the child *stale*, and ``refresh`` recomputes a
stale child in place (same name, new files, new record).

Tensors are computed outside any catalog transaction (files go to the blob store first, which is
harmless if the transaction then fails: ``gc`` collects them); the catalog is written in one short
transaction at the end, all or nothing. Torch is imported only by the functions that need it, so
``lineage`` and ``stale`` stay cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.orm import Session

from libstore.catalog import derivations as deriv
from libstore.catalog import prototypes as cache
from libstore.catalog import repo
from libstore.catalog.models import ExpertRow
from libstore.errors import AlreadyExistsError, LibstoreError, ValidationError
from libstore.ops.context import Context
from libstore.ops.prototypes import Target, resolve_experts
from libstore.ops.tensors import (
    StagedExpert,
    check_compatible,
    read_config,
    stage_expert,
    write_expert,
)
from libstore.store.adapter import validate_name
from libstore.types import Expert

GKS_METHOD_VERSION = 1
"""Version of the stored GenKnowSub results (bump when the computation changes them)."""
MERGE_METHOD_VERSION = 1
"""Version of the stored merge results."""
GKS_MODES = ("param", "delta")
DEFAULT_SUFFIX = "_res"

Status = Literal["created", "reused", "refreshed"]


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
    mode: str
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


@dataclass(frozen=True)
class ChildLink:
    """An expert derived from the one shown: its name, the method, and the parent's role in it."""

    name: str
    method: str
    role: str


@dataclass(frozen=True)
class LineageInfo:
    """How an expert was made (``derivation`` is ``None`` for imported experts) and what was made from it."""

    name: str
    kind: str
    sha256: str
    derivation: deriv.DerivationRecord | None
    children: tuple[ChildLink, ...]

    @property
    def is_stale(self) -> bool:
        return self.derivation is not None and self.derivation.is_stale


@dataclass(frozen=True)
class StaleExpert:
    """A derived expert whose inputs changed since it was computed, and why."""

    name: str
    kind: str
    method: str
    reasons: tuple[str, ...]
    parents: tuple[deriv.ParentRecord, ...]


@dataclass(frozen=True)
class StaleClustering:
    """A recorded clustering whose inputs changed, are gone, or gained experts (``libstore clusters``)."""

    name: str
    metric: str
    k: int
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class StaleReport:
    """Derived experts whose inputs changed, prototype caches whose expert no longer exists, and
    clusterings whose inputs changed."""

    experts: tuple[StaleExpert, ...]
    caches: tuple[cache.CacheEntry, ...]
    clusterings: tuple[StaleClustering, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.experts and not self.caches and not self.clusterings


# --- GenKnowSub --------------------------------------------------------------------------------


@dataclass
class _Plan:
    expert: Expert
    residual: str
    key: str
    status: Status
    reused_name: str | None = None
    staged: StagedExpert | None = None
    params: dict[str, Any] | None = None
    energy_kept: float | None = None


def subtract_general(
    ctx: Context,
    *,
    general: Target,
    experts: Target,
    mode: str = "param",
    rank: int | None = None,
    suffix: str = DEFAULT_SUFFIX,
    refresh: bool = False,
    device: str | None = None,
) -> GksReport:
    """GenKnowSub: a residual expert per expert, minus the average of the general experts.

    Args:
        general: the general-knowledge experts (a query such as ``"kind=general"``, or names).
        experts: the experts to purify (``"kind=task"``); general experts among them are skipped.
        mode: ``param`` (A − mean A_g, B − mean B_g: what PEFT and the paper do; equal ranks) or
            ``delta`` (ΔW − mean ΔW_g exactly, at rank r + Σ r_g, any ranks).
        rank: delta mode only: truncate each module to this rank by SVD; the energy kept is recorded.
        suffix: residual name = expert name + suffix.
        refresh: recompute, in place, residuals that exist but came from other inputs (a changed
            parent, other general experts or parameters). Without it such residuals are an error.
        device: where the math runs. Default ``cpu``: stored weights then do not depend on the
            machine (GPU kernels round differently), and parameter mode stays bit-identical to PEFT.

    Residuals are stored as kind ``residual`` with the parent's tasks and a derivation record (roles
    ``expert`` and ``general``). A residual computed before from the same inputs is reused as is.
    """
    if mode not in GKS_MODES:
        raise ValidationError(f"unknown GenKnowSub mode {mode!r}; modes are {', '.join(GKS_MODES)}")
    if rank is not None:
        if mode != "delta":
            raise ValidationError(
                "--rank truncates delta-mode residuals; parameter mode keeps the expert's rank. "
                "Use --mode delta --rank R"
            )
        if int(rank) < 1:
            raise ValidationError(f"rank must be at least 1, got {rank}")
    method = f"gks-{mode}"
    params: dict[str, Any] = {"mode": mode}
    if mode == "delta":
        params["rank"] = None if rank is None else int(rank)

    gen = resolve_experts(ctx, general)
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
    gen_key = sorted(("general", g.sha256) for g in gen)

    plans: list[_Plan] = []
    outdated: list[str] = []
    with ctx.catalog.read() as s:
        for e in targets:
            name = validate_name(f"{e.name}{suffix}")
            key = deriv.inputs_key(method, GKS_METHOD_VERSION, params, [("expert", e.sha256), *gen_key])
            found = deriv.child_by_inputs_key(s, key)
            if found is not None:
                plans.append(_Plan(e, found.name, key, "reused", reused_name=found.name))
                continue
            status: Status = "created"
            if repo.expert_exists(s, name):
                row = repo.expert_row(s, name)
                d = deriv.derivation_row(s, row)
                if d is None or not d.method.startswith("gks-"):
                    raise AlreadyExistsError(
                        f"an expert named {name!r} already exists and is not a GenKnowSub residual; "
                        f"choose another --suffix, or remove or rename it"
                    )
                if not refresh:
                    outdated.append(name)
                status = "refreshed"
            plans.append(_Plan(e, name, key, status))
    if outdated:
        raise AlreadyExistsError(
            f"residual(s) {', '.join(outdated)} exist but were computed from other inputs (a parent "
            f"changed, or other general experts or parameters); recompute them in place with "
            f"--refresh (Python: refresh=True), or choose another --suffix"
        )

    todo = [p for p in plans if p.status != "reused"]
    if todo:
        _compute_residuals(ctx, todo, gen, mode, rank, params, device or "cpu")
        with ctx.catalog.write() as s:
            gen_rows = _parent_rows(s, gen)
            for p in todo:
                assert p.staged is not None and p.params is not None
                found = deriv.child_by_inputs_key(s, p.key)
                if found is not None:  # a concurrent run made it meanwhile
                    p.status, p.residual = "reused", found.name
                    continue
                (parent,) = _parent_rows(s, [p.expert])
                replace = None
                if p.status == "refreshed":
                    replace = repo.expert_row(s, p.residual)
                elif repo.expert_exists(s, p.residual):
                    raise AlreadyExistsError(
                        f"an expert named {p.residual!r} was added while the residuals were computed; "
                        f"run the command again"
                    )
                row = write_expert(
                    ctx,
                    s,
                    name=p.residual,
                    kind="residual",
                    base_row=parent.base_model,
                    staged=p.staged,
                    tasks=[t.name for t in parent.tasks],
                    metadata=_energy_meta(p.energy_kept),
                    source=f"{method}:{p.expert.name}",
                    replace=replace,
                )
                deriv.record_derivation(
                    s,
                    row,
                    method=method,
                    method_version=GKS_METHOD_VERSION,
                    params=p.params,
                    inputs_key=p.key,
                    parents=[("expert", parent), *(("general", g) for g in gen_rows)],
                )
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
                p.staged.sha256
                if p.staged is not None and p.status != "reused"
                else _sha_of(ctx, p.residual),
                p.energy_kept,
            )
            for p in plans
        ),
    )


def _sha_of(ctx: Context, name: str) -> str:
    with ctx.catalog.read() as s:
        return repo.expert_row(s, name).sha256


def _energy_meta(energy: float | None) -> dict[str, Any]:
    return {} if energy is None else {"energy_kept": energy}


def _parent_rows(s: Session, experts: Sequence[Expert]) -> list[ExpertRow]:
    """The catalog rows of the experts the computation read, checked unchanged since."""
    rows = []
    for e in experts:
        row = repo.expert_row(s, e.name)
        if row.sha256 != e.sha256:
            raise LibstoreError(
                f"expert {e.name!r} changed while derived experts were computed from it; "
                f"run the command again"
            )
        rows.append(row)
    return rows


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
    rank: int | None = None,
    weights: Sequence[float] | None = None,
    refresh: bool = False,
    device: str | None = None,
) -> Expert:
    """Average experts in ΔW space (optionally weighted) into a new expert ``name`` of kind ``merged``.

    ΔW = Σ_i w_i·ΔW_i (w_i = 1/n by default) is re-factorised exactly at rank Σ r_i, or truncated to
    ``rank`` by SVD (the energy kept is recorded in the derivation parameters and the metadata).
    Asking again for the same merge under the same name returns the stored one; ``refresh``
    recomputes an existing merge of that name whose inputs changed. ``device`` defaults to ``cpu``
    (see :func:`subtract_general`).
    """
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
            raise ValidationError(f"{len(w)} weights for {len(names)} experts; give one weight per expert")
        if not all(math.isfinite(x) for x in w):
            raise ValidationError(f"weights must be finite numbers, got {list(weights)}")
    if rank is not None and int(rank) < 1:
        raise ValidationError(f"rank must be at least 1, got {rank}")
    experts = resolve_experts(ctx, names)
    check_compatible(experts, operation="merge")
    params: dict[str, Any] = {"weights": w, "rank": None if rank is None else int(rank)}
    key = deriv.inputs_key("merge", MERGE_METHOD_VERSION, params, [("expert", e.sha256) for e in experts])

    replace_ok = False
    with ctx.catalog.read() as s:
        if repo.expert_exists(s, name):
            row = repo.expert_row(s, name)
            d = deriv.derivation_row(s, row)
            if d is not None and d.inputs_key == key:
                return repo.to_expert(s, row)
            if d is None or d.method != "merge":
                raise AlreadyExistsError(
                    f"an expert named {name!r} already exists and is not a merge; choose another --name"
                )
            if not refresh:
                raise AlreadyExistsError(
                    f"merge {name!r} exists but was computed from other inputs (a parent changed, or "
                    f"other experts, weights or rank); recompute it in place with --refresh "
                    f"(Python: refresh=True), or choose another --name"
                )
            replace_ok = True

    staged, energy = _compute_merge(ctx, experts, w, rank, device or "cpu")
    recorded = {**params, "energy_kept": energy[0], "energy_kept_min": energy[1]}
    with ctx.catalog.write() as s:
        parents = _parent_rows(s, experts)
        replace = None
        if repo.expert_exists(s, name):
            if not replace_ok:
                raise AlreadyExistsError(
                    f"an expert named {name!r} was added while the merge was computed; run it again"
                )
            replace = repo.expert_row(s, name)
        row = write_expert(
            ctx,
            s,
            name=name,
            kind="merged",
            base_row=parents[0].base_model,
            staged=staged,
            tasks=sorted({t.name for p in parents for t in p.tasks}),
            metadata=_energy_meta(energy[0] if rank is not None else None),
            source="merge:" + ",".join(names),
            replace=replace,
        )
        deriv.record_derivation(
            s,
            row,
            method="merge",
            method_version=MERGE_METHOD_VERSION,
            params=recorded,
            inputs_key=key,
            parents=[("expert", p) for p in parents],
        )
        s.flush()
        return repo.to_expert(s, row)


def _compute_merge(
    ctx: Context, experts: Sequence[Expert], weights: Sequence[float], rank: int | None, device: str
) -> tuple[StagedExpert, tuple[float, float]]:
    import torch

    from libstore.lowrank.merge import merge_delta
    from libstore.ops.tensors import load_expert_tensors

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


# --- lineage and staleness ---------------------------------------------------------------------


def lineage(ctx: Context, name: str) -> LineageInfo:
    """Parents (with their current state), method and parameters of ``name``, and its children."""
    with ctx.catalog.read() as s:
        row = repo.expert_row(s, name)
        d = deriv.derivation_row(s, row)
        return LineageInfo(
            name=row.name,
            kind=row.kind,
            sha256=row.sha256,
            derivation=deriv.to_record(s, d, row) if d is not None else None,
            children=tuple(ChildLink(*c) for c in deriv.children_of(s, row)),
        )


def stale(ctx: Context) -> StaleReport:
    """Derived experts whose parents changed or are gone (and, transitively, their descendants), and
    prototype caches whose expert content no longer exists in the catalog."""
    with ctx.catalog.read() as s:
        records = deriv.all_derivations(s)
        orphans = cache.orphaned(s)
    reasons: dict[str, list[str]] = {}
    for r in records:
        for p in r.parents:
            if p.status == "changed":
                reasons.setdefault(r.child, []).append(
                    f"{p.role} {p.name!r} changed (was {p.sha256[:12]}, now {(p.current_sha256 or '')[:12]})"
                )
            elif p.status == "gone":
                reasons.setdefault(r.child, []).append(f"{p.role} {p.name!r} is gone")
    changed = True
    while changed:  # descendants of stale experts are stale too
        changed = False
        for r in records:
            for p in r.parents:
                if p.status == "ok" and p.current_name in reasons and r.child not in reasons:
                    reasons[r.child] = [f"{p.role} {p.current_name!r} is stale"]
                    changed = True
    experts = tuple(
        StaleExpert(r.child, r.child_kind, r.method, tuple(reasons[r.child]), r.parents)
        for r in records
        if r.child in reasons
    )
    from libstore.ops import clusters as _clusters

    clusterings = tuple(
        StaleClustering(c.name, c.metric, c.k, c.stale_reasons) for c in _clusters.stale_clusterings(ctx)
    )
    return StaleReport(experts=experts, caches=tuple(orphans), clusterings=clusterings)
