"""Catalog reads and writes for derivations: "child was computed from these parents".

A derivation is stored as :class:`libstore.types.Derivation`: method, version, parameters, each
parent's role, name and weights sha256 *at derivation time*, and an ``inputs_key`` (computed by the
operation, see ``libstore.ops.derive``) that lets a repeated request find the first result. This
module is the one writer of the ``derivations`` and ``derivation_parents`` tables
(:func:`set_derivation`: GenKnowSub, merge and pull all go through it) and reads them in a constant
number of statements however many experts there are.

A parent is linked by id to the expert it was computed from; when that expert is removed the link is
cleared and the parent is matched by its recorded name instead (an expert re-added under that name
stands for it). :class:`DerivationState` wraps a record with what each parent is *now*; comparing
hashes (and the operation comparing ΔW keys) is how staleness is found.

Every function takes an open ``Session``; the caller owns the transaction. ORM rows never leave this
module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, select, true
from sqlalchemy.orm import Session

from libstore.catalog import reads, repo
from libstore.catalog.batches import chunks
from libstore.catalog.models import DerivationParentRow, DerivationRow, ExpertRow
from libstore.errors import LibstoreError, NotFoundError
from libstore.types import (
    ADAPTER_WEIGHTS,
    Derivation,
    DerivationParent,
    Expert,
    ExpertQuery,
    ParentStatus,
    delta_key,
)

#: Beyond this many names a read fetches every derivation and filters in Python rather than bind
#: a list of names (drivers cap bound parameters); either way a constant number of statements.
_IN_LIMIT = 500


@dataclass(frozen=True)
class ParentState:
    """A recorded parent and the expert that stands for it now.

    Attributes:
        parent: as recorded when the child was computed.
        current_name: the expert that stands for it now (``None`` if gone; differs after a rename).
        current_sha256: that expert's weights hash now.
        current_delta_key: that expert's ΔW key now (:func:`libstore.types.delta_key`).
        status: ``ok`` (same weights), ``changed`` (other weights) or ``gone`` (no such expert).
    """

    parent: DerivationParent
    current_name: str | None
    current_sha256: str | None
    current_delta_key: str | None
    status: ParentStatus


@dataclass(frozen=True)
class DerivationState:
    """A derived expert's derivation record with its parents' current state."""

    child: str
    child_kind: str
    child_sha256: str
    derivation: Derivation
    parents: tuple[ParentState, ...]


# --- reading -------------------------------------------------------------------------------------


def _children(names: Iterable[str] | None) -> tuple[ColumnElement[bool], set[str] | None]:
    """A condition on the child's name for ``names`` (``None``: all), and the names to keep after
    reading when there are too many to bind."""
    if names is None:
        return true(), None
    wanted = set(names)
    if len(wanted) <= _IN_LIMIT:
        return ExpertRow.name.in_(sorted(wanted)), None
    return true(), wanted


_Record = tuple[str, str, str, Derivation, tuple[int | None, ...]]
"""(child name, child kind, child sha256, record, the parents' expert ids or ``None`` where unlinked)"""


def _read(session: Session, where: ColumnElement[bool]) -> list[tuple[int, _Record]]:
    """``(child expert id, record)`` of the derivations matching ``where`` (on ``DerivationRow`` or
    the child's ``ExpertRow``), ordered by child name: the one reader of the two tables (two statements)."""
    heads = session.execute(
        select(
            DerivationRow.id,
            ExpertRow.id,
            ExpertRow.name,
            ExpertRow.kind,
            ExpertRow.sha256,
            DerivationRow.method,
            DerivationRow.method_version,
            DerivationRow.params,
            DerivationRow.inputs_key,
            DerivationRow.created_at,
        )
        .join(ExpertRow, ExpertRow.id == DerivationRow.child_id)
        .where(where)
        .order_by(ExpertRow.name)
    ).all()
    if not heads:
        return []
    parents: dict[int, list[DerivationParent]] = {}
    parent_ids: dict[int, list[int | None]] = {}
    stmt = (
        select(
            DerivationParentRow.derivation_id,
            DerivationParentRow.role,
            DerivationParentRow.parent_name,
            DerivationParentRow.parent_sha256,
            DerivationParentRow.parent_id,
        )
        .join(DerivationRow, DerivationRow.id == DerivationParentRow.derivation_id)
        .join(ExpertRow, ExpertRow.id == DerivationRow.child_id)
        .where(where)
        .order_by(DerivationParentRow.derivation_id, DerivationParentRow.position)
    )
    for did, role, name, sha, pid in session.execute(stmt):
        parents.setdefault(did, []).append(DerivationParent(role, name, sha))
        parent_ids.setdefault(did, []).append(pid)
    return [
        (
            child_id,
            (
                child,
                kind,
                sha,
                reads.derivation(method, version, params, key, created, parents.get(did, ())),
                tuple(parent_ids.get(did, ())),
            ),
        )
        for did, child_id, child, kind, sha, method, version, params, key, created in heads
    ]


def _records(session: Session, names: Iterable[str] | None) -> list[_Record]:
    """The derivations of the children ``names`` (``None``: all), ordered by child name (two
    statements)."""
    cond, keep = _children(names)
    return [r for _, r in _read(session, cond) if keep is None or r[0] in keep]


def derivations_of(session: Session, expert_names: Iterable[str]) -> dict[str, Derivation]:
    """``child name -> how it was derived`` for the derived experts among ``expert_names`` (two
    statements, however many names)."""
    return {child: d for child, _, _, d, _ in _records(session, expert_names)}


def derivation_states(session: Session, names: Iterable[str] | None = None) -> list[DerivationState]:
    """Every derivation (or those of the children ``names``) with its parents' current state, ordered
    by child name (three statements, however many)."""
    records = _records(session, names)
    if not records:
        return []
    ids = {pid for *_, pids in records for pid in pids if pid is not None}
    names_now = {
        p.name for _, _, _, d, pids in records for p, pid in zip(d.parents, pids, strict=True) if pid is None
    }
    by_id, by_name = _current_experts(session, ids, names_now)
    out = []
    for child, kind, sha, d, pids in records:
        states = []
        for p, pid in zip(d.parents, pids, strict=True):
            cur = by_id.get(pid) if pid is not None else by_name.get(p.name)
            if cur is None:
                states.append(ParentState(p, None, None, None, "gone"))
                continue
            name, cur_sha, key = cur
            status: ParentStatus = "ok" if cur_sha == p.sha256 else "changed"
            states.append(ParentState(p, name, cur_sha, key, status))
        out.append(DerivationState(child, kind, sha, d, tuple(states)))
    return out


_Current = tuple[str, str, str]  # (name, sha256, delta key)


def _current_experts(
    session: Session, ids: set[int], names: set[str]
) -> tuple[dict[int, _Current], dict[str, _Current]]:
    """The experts with these ids and these names now, by id and by name (one statement)."""
    stmt = select(
        ExpertRow.id, ExpertRow.name, ExpertRow.sha256, ExpertRow.rank, ExpertRow.alpha, ExpertRow.use_rslora
    )
    if len(ids) + len(names) <= _IN_LIMIT:
        stmt = stmt.where(ExpertRow.id.in_(sorted(ids)) | ExpertRow.name.in_(sorted(names)))
    by_id: dict[int, _Current] = {}
    by_name: dict[str, _Current] = {}
    for eid, name, sha, rank, alpha, rslora in session.execute(stmt):
        cur = (name, sha, delta_key(sha, rank=rank, alpha=alpha, use_rslora=rslora))
        if eid in ids:
            by_id[eid] = cur
        if name in names:
            by_name[name] = cur
    return by_id, by_name


def children_by_inputs_key(session: Session, keys: Iterable[str]) -> dict[str, str]:
    """``inputs key -> name of the expert computed from exactly those inputs`` for the keys that have
    one (the oldest, if several)."""
    wanted = sorted(set(keys))
    found: dict[str, str] = {}
    for part in chunks(wanted, _IN_LIMIT):
        stmt = (
            select(DerivationRow.inputs_key, ExpertRow.name)
            .join(ExpertRow, DerivationRow.child_id == ExpertRow.id)
            .where(DerivationRow.inputs_key.in_(part))
            .order_by(ExpertRow.id.desc())
        )
        found.update({key: name for key, name in session.execute(stmt)})  # the last (oldest) wins
    return found


def children_of(session: Session, name: str) -> list[tuple[str, str, str]]:
    """``(child name, method, role)`` for every expert derived from expert ``name``.

    A parent removed and re-added under the same name is matched by name as well, so its old
    children still show (they are then stale).
    """
    parent_id = repo.expert_row(session, name).id
    stmt = (
        select(ExpertRow.name, DerivationRow.method, DerivationParentRow.role)
        .join(DerivationRow, DerivationRow.child_id == ExpertRow.id)
        .join(DerivationParentRow, DerivationParentRow.derivation_id == DerivationRow.id)
        .where(
            (DerivationParentRow.parent_id == parent_id)
            | (DerivationParentRow.parent_id.is_(None) & (DerivationParentRow.parent_name == name))
        )
        .order_by(ExpertRow.name)
    )
    return sorted({(n, m, r) for n, m, r in session.execute(stmt)})


def experts_named(session: Session, names: Iterable[str]) -> dict[str, Expert]:
    """``name -> Expert`` (without lineage) for the experts among ``names`` that exist."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
    return {
        e.name: e for e in repo.find_experts(session, ExpertQuery(names=tuple(wanted)), with_lineage=False)
    }


# --- writing -------------------------------------------------------------------------------------


def set_derivation(session: Session, child_name: str, d: Derivation | None) -> None:
    """Record how expert ``child_name`` was derived, replacing any earlier record (``None`` removes
    it). Parents are linked to the experts of their recorded names where those exist. The one writer
    of derivations: GenKnowSub, merge and pull all record through it."""
    child = repo.expert_row(session, child_name)
    old = session.scalar(select(DerivationRow).where(DerivationRow.child_id == child.id))
    if old is not None:
        session.delete(old)
        session.flush()
    if d is None:
        return
    ids = {
        n: i
        for n, i in session.execute(
            select(ExpertRow.name, ExpertRow.id).where(
                ExpertRow.name.in_(sorted({p.name for p in d.parents}))
            )
        )
    }
    row = DerivationRow(
        child_id=child.id,
        method=d.method,
        method_version=int(d.method_version),
        params=dict(d.params),
        inputs_key=d.inputs_key,
    )
    row.parents = [
        DerivationParentRow(
            position=i, role=p.role, parent_id=ids.get(p.name), parent_name=p.name, parent_sha256=p.sha256
        )
        for i, p in enumerate(d.parents)
    ]
    session.add(row)
    session.flush()


def save_derived(session: Session, expert: Expert, derivation: Derivation, *, replace: bool) -> Expert:
    """Record a derived expert (its files already in the blob store) with its derivation; returns it
    as stored. ``replace`` points the existing expert of that name at the new files in place (same
    name and id, tasks, tags and creation time, so records that link to it stay valid): a refresh."""
    if replace:
        row = repo.expert_row(session, expert.name)
        repo.replace_files(session, row, expert.files, ADAPTER_WEIGHTS, **repo.expert_columns(expert))
    else:
        repo.add_expert(session, expert)
    set_derivation(session, expert.name, derivation)
    stored = experts_named(session, [expert.name])[expert.name]
    return dataclasses.replace(stored, lineage=derivations_of(session, [expert.name])[expert.name])


def current_parents(session: Session, experts: Sequence[Expert]) -> dict[str, Expert]:
    """The experts a derivation was computed from, as they are now (inside the write transaction that
    records it), checked to be the ΔW the computation read: :class:`NotFoundError` if one was removed
    meanwhile, :class:`LibstoreError` if one changed (run the operation again)."""
    now = experts_named(session, [e.name for e in experts])
    for e in experts:
        cur = now.get(e.name)
        if cur is None:
            raise NotFoundError(
                f"expert {e.name!r} was removed while derived experts were computed from it",
                what="expert",
                name=e.name,
            )
        if cur.delta_key != e.delta_key:
            raise LibstoreError(
                f"expert {e.name!r} changed while derived experts were computed from it; run the "
                f"command again"
            )
    return now
