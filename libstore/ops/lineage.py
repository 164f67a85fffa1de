"""How derived experts were made, what was made from them, and what went stale.

A derived expert is stale when a parent's weights changed or the parent is gone (its recorded sha256
is not the current one), when the ΔW key of a parent no longer gives the recorded inputs key (a
``lora_alpha``, ``r`` or ``use_rslora`` change with the same weights, e.g. pulled), or, transitively,
when a parent is itself stale. ``libstore stale`` also lists orphaned prototype caches and stale
clusterings. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from libstore.catalog import derivations as deriv
from libstore.catalog import prototypes as cache
from libstore.catalog.derivations import DerivationState, ParentState
from libstore.errors import NotFoundError
from libstore.ops.context import Context
from libstore.ops.derive import METHOD_VERSIONS, OUTPUT_PARAMS, inputs_key
from libstore.types import PrototypeSet

__all__ = [
    "ChildLink",
    "DerivationState",
    "LineageInfo",
    "ParentState",
    "StaleClustering",
    "StaleExpert",
    "StaleReport",
    "lineage",
    "stale",
]


@dataclass(frozen=True)
class ChildLink:
    """An expert derived from the one shown: its name, the method, and the parent's role in it."""

    name: str
    method: str
    role: str


@dataclass(frozen=True)
class LineageInfo:
    """How an expert was made (``derivation`` is ``None`` for imported experts), what was made from
    it, and why it is stale (empty: it is not)."""

    name: str
    kind: str
    sha256: str
    derivation: DerivationState | None
    children: tuple[ChildLink, ...]
    stale_reasons: tuple[str, ...] = ()

    @property
    def is_stale(self) -> bool:
        return bool(self.stale_reasons)


@dataclass(frozen=True)
class StaleExpert:
    """A derived expert whose inputs changed since it was computed, and why."""

    name: str
    kind: str
    method: str
    reasons: tuple[str, ...]
    parents: tuple[ParentState, ...]


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
    caches: tuple[PrototypeSet, ...]
    clusterings: tuple[StaleClustering, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.experts and not self.caches and not self.clusterings


def _reasons(state: DerivationState) -> list[str]:
    """Why a derived expert no longer matches its parents (empty: it does)."""
    reasons = []
    for p in state.parents:
        rec = p.parent
        if p.status == "changed":
            now = (p.current_sha256 or "")[:12]
            reasons.append(f"{rec.role} {rec.name!r} changed (was {rec.sha256[:12]}, now {now})")
        elif p.status == "gone":
            reasons.append(f"{rec.role} {rec.name!r} is gone")
    d = state.derivation
    if reasons or METHOD_VERSIONS.get(d.method) != d.method_version:
        return reasons  # a method (version) this libstore does not compute: only hashes can be compared
    inputs = {k: v for k, v in d.params.items() if k not in OUTPUT_PARAMS}
    now = inputs_key(
        d.method,
        d.method_version,
        inputs,
        [(p.parent.role, p.current_delta_key or "") for p in state.parents],
    )
    if now != d.inputs_key:
        reasons.append(
            "a parent's LoRA scale (lora_alpha, r or use_rslora) is not the one it was computed with "
            "(or it was recorded by an older libstore)"
        )
    return reasons


def lineage(ctx: Context, name: str) -> LineageInfo:
    """Parents (with their current state), method and parameters of ``name``, and its children."""
    with ctx.catalog.read() as s:
        e = deriv.experts_named(s, [name]).get(name)
        if e is None:
            raise NotFoundError.expert(name)
        states = deriv.derivation_states(s, [name])
        children = deriv.children_of(s, name)
    state = states[0] if states else None
    return LineageInfo(
        name=e.name,
        kind=e.kind,
        sha256=e.sha256,
        derivation=state,
        children=tuple(ChildLink(*c) for c in children),
        stale_reasons=tuple(_reasons(state)) if state is not None else (),
    )


def stale(ctx: Context) -> StaleReport:
    """Derived experts whose parents changed or are gone (and, transitively, their descendants), and
    prototype caches whose expert content no longer exists in the catalog."""
    with ctx.catalog.read() as s:
        states = deriv.derivation_states(s)
        orphans = cache.orphaned(s)
    reasons: dict[str, list[str]] = {}
    for st in states:
        why = _reasons(st)
        if why:
            reasons[st.child] = why
    changed = True
    while changed:  # descendants of stale experts are stale too
        changed = False
        for st in states:
            for p in st.parents:
                if p.status == "ok" and p.current_name in reasons and st.child not in reasons:
                    reasons[st.child] = [f"{p.parent.role} {p.current_name!r} is stale"]
                    changed = True
    experts = tuple(
        StaleExpert(st.child, st.child_kind, st.derivation.method, tuple(reasons[st.child]), st.parents)
        for st in states
        if st.child in reasons
    )
    from libstore.ops import clusters as _clusters

    clusterings = tuple(
        StaleClustering(c.record.name, c.record.metric, c.record.k, c.stale_reasons)
        for c in _clusters.stale_clusterings(ctx)
    )
    return StaleReport(experts=experts, caches=tuple(orphans), clusterings=clusterings)
