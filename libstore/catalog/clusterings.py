"""Catalog reads and writes for clusterings: recorded MBC runs, their clusters and what they saw.

A run is stored as :class:`libstore.types.ClusteringRecord`: its parameters, the k-selection criterion,
the query it was run on, every expert it saw with that expert's sha256 *at clustering time*
(``clustering_inputs``), and per cluster its members, tasks and statistics (``clusters`` /
``cluster_members`` / ``cluster_tasks``). :func:`insert_clustering` is the one writer (``libstore
cluster`` and pull both record through it); :func:`clustering_records` reads every record in a
constant number of statements.

:class:`Clustering` wraps a record with the library's current state: each input's current name and
hash, the cluster experts linked to each cluster, and the experts added since. A run is *stale* when
an input changed (other hash) or is gone, or when an expert of the same base model now matches the
query that the run did not see.

Every function takes an open ``Session``; the caller owns the transaction. ORM rows never leave this
module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import ColumnElement, select, true
from sqlalchemy.orm import Session

from libstore.catalog import filters, repo
from libstore.catalog.batches import chunks
from libstore.catalog.models import (
    BaseModelRow,
    ClusteringInputRow,
    ClusteringRow,
    ClusterMemberRow,
    ClusterRow,
    ClusterTaskRow,
    ExpertRow,
    TaskRow,
)
from libstore.errors import AlreadyExistsError, InUseError, NotFoundError
from libstore.types import ClusteringInput, ClusteringRecord, ClusterRecord, ExpertQuery

InputStatus = Literal["ok", "changed", "gone"]


@dataclass(frozen=True)
class InputState:
    """An expert a clustering saw, and what stands for it now.

    Attributes:
        input: as recorded (name and weights hash at clustering time).
        current_name: the expert that stands for it now (``None`` if removed; differs after a rename).
        current_sha256: that expert's hash now (``None`` if removed).
        status: ``ok`` (same content), ``changed`` (other content) or ``gone`` (removed).
    """

    input: ClusteringInput
    current_name: str | None
    current_sha256: str | None
    status: InputStatus


@dataclass(frozen=True)
class Cluster:
    """One recorded cluster and the cluster experts linked to it now
    (``libstore add --kind cluster --cluster NAME:INDEX``)."""

    record: ClusterRecord
    experts: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.record.members)

    @property
    def within(self) -> float | None:
        """Mean similarity over pairs of distinct members (``None`` for a singleton)."""
        return self.record.stats.get("within")

    @property
    def between(self) -> float | None:
        """Mean similarity from members to the other experts (``None`` when k = 1)."""
        return self.record.stats.get("between")

    @property
    def silhouette(self) -> float | None:
        """Mean silhouette of the members (``None`` where undefined: k = 1 or k = n)."""
        return self.record.stats.get("silhouette")


@dataclass(frozen=True)
class Clustering:
    """A recorded MBC run with the library's current state.

    Attributes:
        record: the run as stored (and as pushed).
        inputs: each expert the run saw (row order of its similarity matrix) and what it is now.
        clusters: by index, with their linked cluster experts.
        added: experts of the same base model that match the run's query now but were not seen.
        stale_reasons: why the run no longer describes the library (empty: it does).
    """

    record: ClusteringRecord
    inputs: tuple[InputState, ...]
    clusters: tuple[Cluster, ...]
    added: tuple[str, ...] = ()
    stale_reasons: tuple[str, ...] = field(default=())

    @property
    def stale(self) -> bool:
        return bool(self.stale_reasons)

    @property
    def silhouette(self) -> float | None:
        """Mean silhouette of the whole clustering (``None`` where undefined)."""
        value = self.record.criterion.get("silhouette")
        return None if value is None else float(value)

    def cluster_of(self, expert: str) -> int:
        """The index of the cluster ``expert`` (its name at clustering time) is in."""
        for c in self.record.clusters:
            if expert in c.members:
                return c.index
        raise NotFoundError(
            f"clustering {self.record.name!r} did not see an expert named {expert!r}",
            what="expert",
            name=expert,
        )


# --- reading records -----------------------------------------------------------------------------


def _where(name: str | None) -> ColumnElement[bool]:
    return true() if name is None else ClusteringRow.name == name


def _read(session: Session, name: str | None) -> list[tuple[int, int, ClusteringRecord]]:
    """``(row id, base model id, record)`` of one clustering or all, by name (five statements,
    however many)."""
    cond = _where(name)
    heads = session.execute(
        select(
            ClusteringRow.id,
            ClusteringRow.base_model_id,
            ClusteringRow.name,
            BaseModelRow.name,
            ClusteringRow.method,
            ClusteringRow.metric,
            ClusteringRow.k,
            ClusteringRow.seed,
            ClusteringRow.query,
            ClusteringRow.params,
            ClusteringRow.criterion,
            ClusteringRow.created_at,
        )
        .join(BaseModelRow, BaseModelRow.id == ClusteringRow.base_model_id)
        .where(cond)
        .order_by(ClusteringRow.name)
    ).all()
    if not heads:
        return []
    inputs: dict[int, list[ClusteringInput]] = {}
    for cid, n, sha in session.execute(
        select(
            ClusteringInputRow.clustering_id, ClusteringInputRow.expert_name, ClusteringInputRow.expert_sha256
        )
        .join(ClusteringRow, ClusteringRow.id == ClusteringInputRow.clustering_id)
        .where(cond)
        .order_by(ClusteringInputRow.clustering_id, ClusteringInputRow.position)
    ):
        inputs.setdefault(cid, []).append(ClusteringInput(n, sha))
    members: dict[int, list[str]] = {}
    for kid, n in session.execute(
        select(ClusterMemberRow.cluster_id, ClusterMemberRow.expert_name)
        .join(ClusterRow, ClusterRow.id == ClusterMemberRow.cluster_id)
        .join(ClusteringRow, ClusteringRow.id == ClusterRow.clustering_id)
        .where(cond)
        .order_by(ClusterMemberRow.cluster_id, ClusterMemberRow.position)
    ):
        members.setdefault(kid, []).append(n)
    tasks: dict[int, list[str]] = {}
    for kid, n in session.execute(
        select(ClusterTaskRow.cluster_id, TaskRow.name)
        .join(TaskRow, TaskRow.id == ClusterTaskRow.task_id)
        .join(ClusterRow, ClusterRow.id == ClusterTaskRow.cluster_id)
        .join(ClusteringRow, ClusteringRow.id == ClusterRow.clustering_id)
        .where(cond)
    ):
        tasks.setdefault(kid, []).append(n)
    clusters: dict[int, list[ClusterRecord]] = {}
    for kid, cid, index, label, stats in session.execute(
        select(ClusterRow.id, ClusterRow.clustering_id, ClusterRow.index, ClusterRow.label, ClusterRow.stats)
        .join(ClusteringRow, ClusteringRow.id == ClusterRow.clustering_id)
        .where(cond)
        .order_by(ClusterRow.clustering_id, ClusterRow.index)
    ):
        clusters.setdefault(cid, []).append(
            ClusterRecord(
                index=index,
                members=tuple(members.get(kid, ())),
                tasks=tuple(sorted(tasks.get(kid, ()))),
                label=label,
                stats=dict(stats or {}),
            )
        )
    return [
        (
            cid,
            base_id,
            ClusteringRecord(
                name=cname,
                base_model=base,
                method=method,
                metric=metric,
                k=k,
                seed=seed,
                query=query or "",
                params=dict(params or {}),
                criterion=dict(criterion or {}),
                inputs=tuple(inputs.get(cid, ())),
                clusters=tuple(clusters.get(cid, ())),
                created_at=created,
            ),
        )
        for cid, base_id, cname, base, method, metric, k, seed, query, params, criterion, created in heads
    ]


def clustering_records(session: Session) -> list[ClusteringRecord]:
    """Every recorded clustering, by name (a constant number of statements)."""
    return [rec for _, _, rec in _read(session, None)]


def clustering_record(session: Session, name: str) -> ClusteringRecord | None:
    """The clustering named ``name``, or ``None``."""
    found = _read(session, name)
    return found[0][2] if found else None


def clustering_exists(session: Session, name: str) -> bool:
    return session.scalar(select(ClusteringRow.id).where(ClusteringRow.name == name)) is not None


def _missing(session: Session, name: str) -> NotFoundError:
    known = ", ".join(session.scalars(select(ClusteringRow.name).order_by(ClusteringRow.name)))
    return NotFoundError(
        f"no clustering named {name!r} ({'recorded: ' + known if known else 'none recorded yet'});"
        f" list them with: libstore clusters ls",
        what="clustering",
        name=name,
    )


# --- reading with the current state --------------------------------------------------------------


def clustering(session: Session, name: str, *, parse: Callable[[str], ExpertQuery]) -> Clustering:
    """The clustering ``name`` with the library's current state (``parse`` reads its query)."""
    found = _views(session, name, parse)
    if not found:
        raise _missing(session, name)
    return found[0]


def clusterings(session: Session, *, parse: Callable[[str], ExpertQuery]) -> list[Clustering]:
    """Every recorded clustering, by name, with the library's current state."""
    return _views(session, None, parse)


def _views(session: Session, name: str | None, parse: Callable[[str], ExpertQuery]) -> list[Clustering]:
    records = _read(session, name)
    if not records:
        return []
    cond = _where(name)
    now: dict[tuple[int, int], tuple[str, str] | None] = {}
    seen: dict[int, set[int]] = {}
    for cid, pos, eid, cur_name, cur_sha in session.execute(
        select(
            ClusteringInputRow.clustering_id,
            ClusteringInputRow.position,
            ClusteringInputRow.expert_id,
            ExpertRow.name,
            ExpertRow.sha256,
        )
        .join(ClusteringRow, ClusteringRow.id == ClusteringInputRow.clustering_id)
        .outerjoin(ExpertRow, ExpertRow.id == ClusteringInputRow.expert_id)
        .where(cond)
    ):
        now[(cid, pos)] = None if cur_name is None else (cur_name, cur_sha)
        if eid is not None:
            seen.setdefault(cid, set()).add(eid)
    linked: dict[tuple[int, int], list[str]] = {}
    for cid, index, expert in session.execute(
        select(ClusterRow.clustering_id, ClusterRow.index, ExpertRow.name)
        .join(ExpertRow, ExpertRow.cluster_id == ClusterRow.id)
        .join(ClusteringRow, ClusteringRow.id == ClusterRow.clustering_id)
        .where(cond)
        .order_by(ExpertRow.name)
    ):
        linked.setdefault((cid, index), []).append(expert)
    out = []
    for cid, base_id, rec in records:
        inputs = []
        for pos, i in enumerate(rec.inputs):
            cur = now.get((cid, pos))
            if cur is None:
                inputs.append(InputState(i, None, None, "gone"))
            else:
                inputs.append(InputState(i, cur[0], cur[1], "ok" if cur[1] == i.sha256 else "changed"))
        added = _added(session, base_id, parse(rec.query), seen.get(cid, set()))
        out.append(
            Clustering(
                record=rec,
                inputs=tuple(inputs),
                clusters=tuple(Cluster(c, tuple(linked.get((cid, c.index), ()))) for c in rec.clusters),
                added=tuple(added),
                stale_reasons=_stale_reasons(inputs, added, rec.query),
            )
        )
    return out


def _added(session: Session, base_id: int, query: ExpertQuery, seen: set[int]) -> list[str]:
    """Experts of the clustering's base model that match ``query`` now and that it did not see."""
    stmt = (
        filters.query_statement(session, query)
        .with_only_columns(ExpertRow.id, ExpertRow.name)
        .where(ExpertRow.base_model_id == base_id)
    )
    return sorted(name for eid, name in session.execute(stmt) if eid not in seen)


def _stale_reasons(inputs: Sequence[InputState], added: Sequence[str], query: str) -> tuple[str, ...]:
    reasons = [
        f"{i.input.name!r} changed (was {i.input.sha256[:12]}, now {(i.current_sha256 or '')[:12]})"
        if i.status == "changed"
        else f"{i.input.name!r} is gone"
        for i in inputs
        if i.status != "ok"
    ]
    if added:
        shown = ", ".join(repr(a) for a in added[:5]) + (
            f" and {len(added) - 5} more" if len(added) > 5 else ""
        )
        reasons.append(f"{len(added)} expert(s) matching {query!r} added since: {shown}")
    return tuple(reasons)


def cluster_id(session: Session, ref: str | None) -> int | None:
    """The id of cluster ``CLUSTERING:INDEX`` for an expert to link to; ``None`` for ``None`` or a
    cluster this library does not have."""
    if ref is None:
        return None
    name, _, index = ref.rpartition(":")
    if not index.isdigit() or int(index) >= 2**31:
        return None
    return session.scalar(
        select(ClusterRow.id)
        .join(ClusteringRow, ClusterRow.clustering_id == ClusteringRow.id)
        .where(ClusteringRow.name == name, ClusterRow.index == int(index))
    )


# --- writing -------------------------------------------------------------------------------------


def insert_clustering(session: Session, rec: ClusteringRecord, *, require_inputs: bool = False) -> None:
    """Record a clustering: the one writer of clusterings (``libstore cluster`` and pull).

    Its base model must be registered; inputs and members are linked by name to the experts that
    exist (an expert added later under that name is linked by pull's ``link_experts``).
    ``require_inputs`` refuses a record whose inputs are not all present (an expert removed while
    the clustering was computed).
    """
    if clustering_exists(session, rec.name):
        raise AlreadyExistsError(
            f"a clustering named {rec.name!r} already exists; pass another --name, or remove it first: "
            f"libstore clusters rm {rec.name}",
            what="clustering",
            name=rec.name,
        )
    base = repo.base_row(session, rec.base_model)
    names = sorted({i.name for i in rec.inputs} | {m for c in rec.clusters for m in c.members})
    ids: dict[str, int] = {}
    for chunk in chunks(names, 900):  # stay below SQLite's bound-parameter limit
        stmt = select(ExpertRow.name, ExpertRow.id).where(ExpertRow.name.in_(chunk))
        ids.update({n: eid for n, eid in session.execute(stmt)})
    missing = [i.name for i in rec.inputs if i.name not in ids]
    if require_inputs and missing:
        raise NotFoundError(
            f"expert {missing[0]!r} was removed or renamed while the clustering ran; run it again",
            what="expert",
            name=missing[0],
        )
    row = ClusteringRow(
        name=rec.name,
        base_model_id=base.id,
        method=rec.method,
        metric=rec.metric,
        k=rec.k,
        seed=rec.seed,
        params=dict(rec.params),
        criterion=dict(rec.criterion),
        query=rec.query,
    )
    row.inputs = [
        ClusteringInputRow(position=p, expert_id=ids.get(i.name), expert_name=i.name, expert_sha256=i.sha256)
        for p, i in enumerate(rec.inputs)
    ]
    task_rows = _task_rows(session, {t for c in rec.clusters for t in c.tasks})
    row.clusters = []
    for c in rec.clusters:
        cluster = ClusterRow(index=c.index, label=c.label, stats=dict(c.stats))
        cluster.members = [
            ClusterMemberRow(position=p, expert_id=ids.get(n), expert_name=n) for p, n in enumerate(c.members)
        ]
        cluster.tasks = [task_rows[t] for t in sorted(set(c.tasks))]
        row.clusters.append(cluster)
    session.add(row)
    session.flush()


def _task_rows(session: Session, names: Iterable[str]) -> dict[str, TaskRow]:
    """Task rows by name, creating the missing ones (a few statements for any number of names)."""
    wanted = sorted(set(names))
    rows: dict[str, TaskRow] = {}
    for chunk in chunks(wanted, 900):
        rows.update({t.name: t for t in session.scalars(select(TaskRow).where(TaskRow.name.in_(chunk)))})
    for n in wanted:
        if n not in rows:
            rows[n] = TaskRow(name=n)
            session.add(rows[n])
    session.flush()
    return rows


def delete_clustering(session: Session, name: str, *, force: bool = False) -> list[str]:
    """Delete the run with its clusters; returns the cluster experts that were linked to it.

    Refused with :class:`InUseError` while cluster experts link to it, unless ``force``: the experts
    then stay (their tasks too) and their link to the cluster is cleared.
    """
    row = session.scalar(select(ClusteringRow).where(ClusteringRow.name == name))
    if row is None:
        raise _missing(session, name)
    ids = [c.id for c in row.clusters]
    linked = list(
        session.scalars(select(ExpertRow).where(ExpertRow.cluster_id.in_(ids)).order_by(ExpertRow.name))
    )
    if linked and not force:
        names = tuple(e.name for e in linked)
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        raise InUseError(
            f"cluster experts are linked to {name!r} ({shown}); pass --force to remove it anyway (the "
            f"experts stay, their link to the cluster is cleared)",
            what="clustering",
            name=name,
            used_by=names,
        )
    for expert in linked:
        expert.cluster_id = None
    session.flush()
    session.delete(row)
    session.flush()
    return [e.name for e in linked]
