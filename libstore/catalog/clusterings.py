"""Catalog queries and writes for clusterings: recorded MBC runs, their clusters and what they saw.

A clustering row holds the run's parameters, the k-selection criterion and the query it was run on;
``clustering_inputs`` holds every expert it saw with that expert's sha256 *at clustering time*;
``clusters`` / ``cluster_members`` / ``cluster_tasks`` hold the result. A run is *stale* when an input
changed (other hash) or is gone, or when an expert of the same base model now matches the query that
the run did not see (:func:`to_clustering` is told which, see :func:`added_experts`).

Every function takes an open ``Session``; the caller owns the transaction. ORM rows stay inside the
catalog and ops layers; :func:`to_clustering` turns a row into the plain :class:`Clustering`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from libstore.catalog import filters
from libstore.catalog.models import (
    BaseModelRow,
    ClusteringInputRow,
    ClusteringRow,
    ClusterMemberRow,
    ClusterRow,
    ExpertRow,
    TaskRow,
)
from libstore.errors import AlreadyExistsError, NotFoundError
from libstore.types import ExpertQuery

InputStatus = Literal["ok", "changed", "gone"]


@dataclass(frozen=True)
class ClusteringInput:
    """An expert a clustering saw, and what it is now.

    Attributes:
        name: its name when the run was made.
        sha256: its weights hash when the run was made.
        current_name: the expert that stands for it now (``None`` if removed; differs after a rename).
        current_sha256: that expert's hash now (``None`` if removed).
        status: ``ok`` (same content), ``changed`` (other content) or ``gone`` (removed).
    """

    name: str
    sha256: str
    current_name: str | None
    current_sha256: str | None
    status: InputStatus


@dataclass(frozen=True)
class Cluster:
    """One cluster of a clustering.

    Attributes:
        index: its number, 0..k−1: clusters are numbered by their first member in name order, so the
            same partition always gets the same numbers.
        size: number of members.
        members: the experts in it (names at clustering time), in name order.
        tasks: what a cluster expert for it should be trained on: the union of the members' tasks
            (a member without tasks counts as the task of its own name), sorted.
        within: mean similarity over pairs of distinct members (``None`` for a singleton).
        between: mean similarity from members to the other experts (``None`` when k = 1).
        silhouette: mean silhouette of its members (``None`` where undefined: k = 1 or k = n).
        experts: cluster experts linked to it (``libstore add --kind cluster --cluster NAME:INDEX``).
    """

    index: int
    size: int
    members: tuple[str, ...]
    tasks: tuple[str, ...]
    within: float | None
    between: float | None
    silhouette: float | None
    experts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Clustering:
    """One recorded MBC run.

    Attributes:
        name: the clustering's name (``mbc-k10``); clusters are referred to as ``NAME:INDEX``.
        base_model: the base model of every expert clustered.
        method: ``mbc``.
        metric: ``flat`` (mttl's MBC: flattened parameters, top ``keep`` by magnitude, SVD to ``dim``,
            cosine) or ``delta`` (exact cosine of ΔW).
        k: number of clusters.
        seed: seed of k-means (k-means++ starts, ``n_init`` restarts).
        query: the canonical query the experts were selected by.
        params: every other parameter (``keep``, ``dim``, ``n_init``, ``max_iter``, ...).
        criterion: how k was chosen: ``{"name": "given"}``, or ``{"name": "silhouette", "k_range":
            [...], "scores": {"2": s, ...}}`` (a score is ``None`` where undefined), or ``{"name":
            "too few experts", ...}``; with the result's ``silhouette`` and k-means ``inertia``.
        silhouette: mean silhouette of the whole clustering (``None`` where undefined).
        clusters: the clusters, by index.
        inputs: every expert the run saw, in row order of its similarity matrix (sorted by name).
        added: experts of the same base model that match ``query`` now but were not seen.
        stale: an input changed or is gone, or an expert was added; ``stale_reasons`` says which.
    """

    name: str
    base_model: str
    method: str
    metric: str
    k: int
    seed: int
    query: str
    params: dict[str, Any]
    criterion: dict[str, Any]
    silhouette: float | None
    clusters: tuple[Cluster, ...]
    inputs: tuple[ClusteringInput, ...]
    added: tuple[str, ...] = ()
    stale: bool = False
    stale_reasons: tuple[str, ...] = field(default=())
    created_at: dt.datetime | None = None

    def cluster_of(self, expert: str) -> int:
        """The index of the cluster ``expert`` (its name at clustering time) is in."""
        for c in self.clusters:
            if expert in c.members:
                return c.index
        raise NotFoundError(f"clustering {self.name!r} did not see an expert named {expert!r}")


@dataclass(frozen=True)
class NewCluster:
    """A cluster to record: positions of its members among the inputs, its tasks and statistics."""

    members: tuple[int, ...]
    tasks: tuple[str, ...]
    stats: dict[str, Any]


# --- reading -----------------------------------------------------------------------------------


def clustering_row(session: Session, name: str) -> ClusteringRow:
    row = session.scalar(select(ClusteringRow).where(ClusteringRow.name == name))
    if row is None:
        known = ", ".join(session.scalars(select(ClusteringRow.name).order_by(ClusteringRow.name)))
        raise NotFoundError(
            f"no clustering named {name!r} ({'recorded: ' + known if known else 'none recorded yet'});"
            f" list them with: libstore clusters ls"
        )
    return row


def clustering_exists(session: Session, name: str) -> bool:
    return session.scalar(select(ClusteringRow.id).where(ClusteringRow.name == name)) is not None


def clustering_rows(session: Session) -> list[ClusteringRow]:
    return list(session.scalars(select(ClusteringRow).order_by(ClusteringRow.name)))


def input_records(session: Session, row: ClusteringRow) -> list[ClusteringInput]:
    """Every input of ``row`` with its current state (one query for all of them)."""
    ids = [i.expert_id for i in row.inputs if i.expert_id is not None]
    current: dict[int, tuple[str, str]] = {}
    for chunk in _chunks(ids, 900):  # stay below SQLite's bound-parameter limit
        stmt = select(ExpertRow.id, ExpertRow.name, ExpertRow.sha256).where(ExpertRow.id.in_(chunk))
        current.update({eid: (name, sha) for eid, name, sha in session.execute(stmt)})
    out = []
    for i in row.inputs:
        now = current.get(i.expert_id) if i.expert_id is not None else None
        if now is None:
            out.append(ClusteringInput(i.expert_name, i.expert_sha256, None, None, "gone"))
        else:
            status: InputStatus = "ok" if now[1] == i.expert_sha256 else "changed"
            out.append(ClusteringInput(i.expert_name, i.expert_sha256, now[0], now[1], status))
    return out


def added_experts(session: Session, row: ClusteringRow, query: ExpertQuery) -> list[str]:
    """Experts of the clustering's base model that match ``query`` now and that it did not see."""
    seen = {i.expert_id for i in row.inputs if i.expert_id is not None}
    stmt = (
        filters.query_statement(session, query)
        .with_only_columns(ExpertRow.id, ExpertRow.name)
        .where(ExpertRow.base_model_id == row.base_model_id)
    )
    return sorted(name for eid, name in session.execute(stmt) if eid not in seen)


def to_clustering(session: Session, row: ClusteringRow, *, added: Sequence[str] = ()) -> Clustering:
    """The plain record of ``row``; ``added`` (from :func:`added_experts`) counts towards staleness."""
    inputs = input_records(session, row)
    linked: dict[int, list[str]] = {}
    cluster_ids = [c.id for c in row.clusters]
    if cluster_ids:
        stmt = (
            select(ExpertRow.cluster_id, ExpertRow.name)
            .where(ExpertRow.cluster_id.in_(cluster_ids))
            .order_by(ExpertRow.name)
        )
        for cid, name in session.execute(stmt):
            if cid is not None:
                linked.setdefault(cid, []).append(name)
    clusters = tuple(
        Cluster(
            index=c.index,
            size=len(c.members),
            members=tuple(m.expert_name for m in c.members),
            tasks=tuple(t.name for t in c.tasks),
            within=c.stats.get("within"),
            between=c.stats.get("between"),
            silhouette=c.stats.get("silhouette"),
            experts=tuple(linked.get(c.id, ())),
        )
        for c in row.clusters
    )
    reasons = [
        f"{i.name!r} changed (was {i.sha256[:12]}, now {(i.current_sha256 or '')[:12]})"
        if i.status == "changed"
        else f"{i.name!r} is gone"
        for i in inputs
        if i.status != "ok"
    ]
    if added:
        shown = ", ".join(repr(a) for a in added[:5]) + (
            f" and {len(added) - 5} more" if len(added) > 5 else ""
        )
        reasons.append(f"{len(added)} expert(s) matching {row.query!r} added since: {shown}")
    base = session.get(BaseModelRow, row.base_model_id)
    criterion = dict(row.criterion or {})
    return Clustering(
        name=row.name,
        base_model=base.name if base is not None else "?",
        method=row.method,
        metric=row.metric,
        k=row.k,
        seed=row.seed,
        query=row.query,
        params=dict(row.params or {}),
        criterion=criterion,
        silhouette=criterion.get("silhouette"),
        clusters=clusters,
        inputs=tuple(inputs),
        added=tuple(added),
        stale=bool(reasons),
        stale_reasons=tuple(reasons),
        created_at=row.created_at,
    )


def linked_experts(session: Session, row: ClusteringRow) -> list[str]:
    """Cluster experts linked to any cluster of ``row``."""
    ids = [c.id for c in row.clusters]
    if not ids:
        return []
    stmt = select(ExpertRow.name).where(ExpertRow.cluster_id.in_(ids)).order_by(ExpertRow.name)
    return list(session.scalars(stmt))


# --- writing -----------------------------------------------------------------------------------


def insert_clustering(
    session: Session,
    *,
    name: str,
    base: BaseModelRow,
    method: str,
    metric: str,
    k: int,
    seed: int,
    params: dict[str, Any],
    criterion: dict[str, Any],
    query: str,
    inputs: Sequence[tuple[str, str]],
    clusters: Sequence[NewCluster],
) -> ClusteringRow:
    """Record a run. ``inputs`` are (expert name, sha256 it was computed from), in row order; each
    must name an existing expert (looked up here, so the record links to it by id)."""
    if clustering_exists(session, name):
        raise AlreadyExistsError(
            f"a clustering named {name!r} already exists; pass another --name, or remove it first: "
            f"libstore clusters rm {name}"
        )
    names = [n for n, _ in inputs]
    ids: dict[str, int] = {}
    for chunk in _chunks(names, 900):
        stmt = select(ExpertRow.name, ExpertRow.id).where(ExpertRow.name.in_(chunk))
        ids.update({name: eid for name, eid in session.execute(stmt)})
    missing = [n for n in names if n not in ids]
    if missing:
        raise NotFoundError(
            f"expert {missing[0]!r} was removed or renamed while the clustering ran; run it again"
        )
    row = ClusteringRow(
        name=name,
        base_model_id=base.id,
        method=method,
        metric=metric,
        k=k,
        seed=seed,
        params=dict(params),
        criterion=dict(criterion),
        query=query,
    )
    row.inputs = [
        ClusteringInputRow(position=p, expert_id=ids[n], expert_name=n, expert_sha256=sha)
        for p, (n, sha) in enumerate(inputs)
    ]
    task_rows = task_rows_for(session, {t for c in clusters for t in c.tasks})
    row.clusters = []
    for index, c in enumerate(clusters):
        cluster = ClusterRow(index=index, stats=dict(c.stats))
        cluster.members = [
            ClusterMemberRow(position=p, expert_id=ids[names[i]], expert_name=names[i])
            for p, i in enumerate(c.members)
        ]
        cluster.tasks = [task_rows[t] for t in sorted(set(c.tasks))]
        row.clusters.append(cluster)
    session.add(row)
    session.flush()
    return row


def task_rows_for(session: Session, names: Iterable[str]) -> dict[str, TaskRow]:
    """Task rows by name, creating the missing ones (a few queries for any number of names)."""
    wanted = sorted(set(names))
    rows: dict[str, TaskRow] = {}
    for chunk in _chunks(wanted, 900):
        rows.update({t.name: t for t in session.scalars(select(TaskRow).where(TaskRow.name.in_(chunk)))})
    for n in wanted:
        if n not in rows:
            rows[n] = TaskRow(name=n)
            session.add(rows[n])
    session.flush()
    return rows


def delete_clustering(session: Session, row: ClusteringRow) -> None:
    """Delete the run with its clusters; linked cluster experts stay (their link is cleared)."""
    ids = [c.id for c in row.clusters]
    if ids:
        for expert in session.scalars(select(ExpertRow).where(ExpertRow.cluster_id.in_(ids))):
            expert.cluster_id = None
        session.flush()
    session.delete(row)
    session.flush()


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
