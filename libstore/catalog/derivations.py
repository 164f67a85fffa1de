"""Catalog queries and writes for derivations: "child was computed from these parents".

A derivation row records the method, its version, the parameters and an ``inputs_key`` (sha256 over
method, version, input parameters and the parents' content hashes) so an operation asked twice for
the same thing finds the first result instead of computing it again. Each parent is recorded with its
role, its name and its sha256 *at derivation time*; comparing that hash with the parent's current one
is how staleness is detected (``parent_status``).

Every function takes an open ``Session``; the caller owns the transaction. ORM rows stay inside the
catalog and ops layers; ``to_record`` turns a row into the plain :class:`DerivationRecord`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from libstore.canonical import canonical_sha256
from libstore.catalog.models import DerivationParentRow, DerivationRow, ExpertRow

ParentStatus = Literal["ok", "changed", "gone"]


@dataclass(frozen=True)
class ParentRecord:
    """One parent of a derivation, with what it is now.

    Attributes:
        role: its part in the method (``expert``, ``general``).
        name: the parent's name when the child was computed.
        sha256: the parent's weights hash when the child was computed.
        current_name: the expert that stands for it now (``None`` if gone).
        current_sha256: that expert's hash now (``None`` if gone).
        status: ``ok`` (same content), ``changed`` (other content) or ``gone`` (no such expert).
    """

    role: str
    name: str
    sha256: str
    current_name: str | None
    current_sha256: str | None
    status: ParentStatus


@dataclass(frozen=True)
class DerivationRecord:
    """A derivation as recorded, with each parent's current state."""

    child: str
    child_kind: str
    child_sha256: str
    method: str
    method_version: int
    params: dict[str, Any]
    inputs_key: str
    parents: tuple[ParentRecord, ...]
    created_at: dt.datetime | None = None

    @property
    def is_stale(self) -> bool:
        return any(p.status != "ok" for p in self.parents)


def inputs_key(
    method: str, method_version: int, params: dict[str, Any], parents: Sequence[tuple[str, str]]
) -> str:
    """sha256 over method, version, input parameters and ``(role, parent sha256)`` pairs.

    Parents are hashed in the order given: callers sort roles whose order does not matter.
    """
    payload = {
        "method": method,
        "method_version": int(method_version),
        "params": params,
        "parents": [[role, sha] for role, sha in parents],
    }
    return canonical_sha256(payload)


def derivation_row(session: Session, child: ExpertRow) -> DerivationRow | None:
    return session.scalar(select(DerivationRow).where(DerivationRow.child_id == child.id))


def child_by_inputs_key(session: Session, key: str) -> ExpertRow | None:
    """The expert computed from exactly these inputs, if one exists."""
    stmt = (
        select(ExpertRow)
        .join(DerivationRow, DerivationRow.child_id == ExpertRow.id)
        .where(DerivationRow.inputs_key == key)
        .order_by(ExpertRow.id)
        .limit(1)
    )
    return session.scalar(stmt)


def record_derivation(
    session: Session,
    child: ExpertRow,
    *,
    method: str,
    method_version: int,
    params: dict[str, Any],
    inputs_key: str,
    parents: Sequence[tuple[str, ExpertRow]],
) -> DerivationRow:
    """Record (or replace, for a refresh in place) how ``child`` was computed."""
    old = derivation_row(session, child)
    if old is not None:
        session.delete(old)
        session.flush()
    row = DerivationRow(
        child_id=child.id,
        method=method,
        method_version=int(method_version),
        params=dict(params),
        inputs_key=inputs_key,
    )
    row.parents = [
        DerivationParentRow(position=i, role=role, parent_id=p.id, parent_name=p.name, parent_sha256=p.sha256)
        for i, (role, p) in enumerate(parents)
    ]
    session.add(row)
    session.flush()
    return row


def _current_parent(session: Session, p: DerivationParentRow) -> ExpertRow | None:
    """The parent by id while it exists, else an expert re-added under the recorded name."""
    if p.parent_id is not None:
        row = session.get(ExpertRow, p.parent_id)
        if row is not None:
            return row
    return session.scalar(select(ExpertRow).where(ExpertRow.name == p.parent_name))


def parent_status(session: Session, p: DerivationParentRow) -> ParentRecord:
    cur = _current_parent(session, p)
    if cur is None:
        status: ParentStatus = "gone"
    elif cur.sha256 == p.parent_sha256:
        status = "ok"
    else:
        status = "changed"
    return ParentRecord(
        role=p.role,
        name=p.parent_name,
        sha256=p.parent_sha256,
        current_name=cur.name if cur is not None else None,
        current_sha256=cur.sha256 if cur is not None else None,
        status=status,
    )


def to_record(session: Session, d: DerivationRow, child: ExpertRow | None = None) -> DerivationRecord:
    child = child if child is not None else session.get(ExpertRow, d.child_id)
    assert child is not None  # child_id cascades on delete
    return DerivationRecord(
        child=child.name,
        child_kind=child.kind,
        child_sha256=child.sha256,
        method=d.method,
        method_version=d.method_version,
        params=dict(d.params or {}),
        inputs_key=d.inputs_key,
        parents=tuple(parent_status(session, p) for p in d.parents),
        created_at=d.created_at,
    )


def all_derivations(session: Session) -> list[DerivationRecord]:
    """Every derivation with its parents' current state, ordered by child name."""
    stmt = (
        select(DerivationRow, ExpertRow)
        .join(ExpertRow, DerivationRow.child_id == ExpertRow.id)
        .order_by(ExpertRow.name)
    )
    return [to_record(session, d, child) for d, child in session.execute(stmt)]


def children_of(session: Session, parent: ExpertRow) -> list[tuple[str, str, str]]:
    """``(child name, method, role)`` for every expert derived from ``parent``.

    A parent removed and re-added under the same name is matched by name as well, so its old
    children still show (they are then stale).
    """
    stmt = (
        select(ExpertRow.name, DerivationRow.method, DerivationParentRow.role)
        .join(DerivationRow, DerivationRow.child_id == ExpertRow.id)
        .join(DerivationParentRow, DerivationParentRow.derivation_id == DerivationRow.id)
        .where(
            (DerivationParentRow.parent_id == parent.id)
            | (DerivationParentRow.parent_id.is_(None) & (DerivationParentRow.parent_name == parent.name))
        )
        .order_by(ExpertRow.name)
    )
    return sorted({(n, m, r) for n, m, r in session.execute(stmt)})
