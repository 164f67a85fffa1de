"""Catalog queries and writes for recorded evaluations (``libstore eval``).

An ``evaluations`` row holds what ran (base model, query, routers, parameters), on which data (the
JSONL file's sha256) and the metrics; ``evaluation_experts`` holds every routed expert with its
sha256 *at evaluation time*, linked by id so renames are followed. An evaluation is *stale* when one
of them now has other weights or is gone: its numbers no longer describe the library.

Every function takes an open ``Session``; the caller owns the transaction. Rows stay here: the
functions return :class:`~libstore.types.EvalRecord` and :class:`Evaluation` views.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from libstore.catalog.batches import chunks
from libstore.catalog.models import EvaluationExpertRow, EvaluationRow, ExpertRow
from libstore.errors import AlreadyExistsError, NotFoundError
from libstore.types import ClusteringInput, EvalMetrics, EvalRecord

ExpertStatus = Literal["ok", "changed", "gone"]
_AUTO = re.compile(r"eval-(\d+)")


@dataclass(frozen=True)
class EvalExpert:
    """An expert an evaluation routed over, and what it is now.

    Attributes:
        name, sha256: at evaluation time.
        current_name, current_sha256: the expert that stands for it now (``None`` if removed).
        status: ``ok`` (same weights), ``changed`` or ``gone``.
    """

    name: str
    sha256: str
    current_name: str | None
    current_sha256: str | None
    status: ExpertStatus


@dataclass(frozen=True)
class Evaluation:
    """A recorded evaluation with the current state of its experts.

    Attributes:
        record: what was recorded.
        experts: each routed expert then and now.
    """

    record: EvalRecord
    experts: tuple[EvalExpert, ...]

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def stale(self) -> bool:
        """An expert's weights changed or it is gone since the evaluation ran."""
        return any(e.status != "ok" for e in self.experts)

    @property
    def stale_reasons(self) -> tuple[str, ...]:
        return tuple(
            f"{e.name!r} changed (was {e.sha256[:12]}, now {(e.current_sha256 or '')[:12]})"
            if e.status == "changed"
            else f"{e.name!r} is gone"
            for e in self.experts
            if e.status != "ok"
        )


def next_name(session: Session) -> str:
    """``eval-N``, N one above the highest automatic name so far."""
    names = session.scalars(select(EvaluationRow.name).where(EvaluationRow.name.like("eval-%")))
    numbers = [int(m.group(1)) for n in names if (m := _AUTO.fullmatch(n))]
    return f"eval-{max(numbers, default=0) + 1}"


def insert(session: Session, rec: EvalRecord) -> EvalRecord:
    """Record ``rec``; every expert it names must exist (linked by id). Returns it as stored."""
    if session.scalar(select(func.count()).where(EvaluationRow.name == rec.name)):
        raise AlreadyExistsError(
            f"an evaluation named {rec.name!r} already exists; pass another --name, or remove it: "
            f"libstore evals rm {rec.name}",
            what="evaluation",
            name=rec.name,
        )
    ids = _ids_by_name(session, [e.name for e in rec.experts])
    missing = [e.name for e in rec.experts if e.name not in ids]
    if missing:
        raise NotFoundError(
            f"expert {missing[0]!r} was removed or renamed while the evaluation ran; run it again",
            what="expert",
            name=missing[0],
        )
    row = EvaluationRow(
        name=rec.name,
        base_model=rec.base_model,
        query=rec.query,
        data_path=rec.data_path,
        data_sha256=rec.data_sha256,
        examples=rec.examples,
        tasks=list(rec.tasks),
        routers=list(rec.routers),
        params=dict(rec.params),
        metrics={
            label: {task: _metrics_json(m) for task, m in per.items()} for label, per in rec.metrics.items()
        },
    )
    row.experts = [
        EvaluationExpertRow(position=p, expert_id=ids[e.name], expert_name=e.name, expert_sha256=e.sha256)
        for p, e in enumerate(rec.experts)
    ]
    session.add(row)
    session.flush()
    return _record(row)


def get(session: Session, name: str) -> Evaluation:
    row = session.scalar(select(EvaluationRow).where(EvaluationRow.name == name))
    if row is None:
        raise NotFoundError(
            f"no evaluation named {name!r}; list them with: libstore evals ls", what="evaluation", name=name
        )
    return views(session, [row])[0]


def all_evaluations(session: Session) -> list[Evaluation]:
    """Every evaluation, oldest first (three statements, whatever the count)."""
    rows = list(session.scalars(select(EvaluationRow).order_by(EvaluationRow.created_at, EvaluationRow.id)))
    return views(session, rows)


def delete(session: Session, name: str) -> None:
    row = session.scalar(select(EvaluationRow).where(EvaluationRow.name == name))
    if row is None:
        raise NotFoundError(f"no evaluation named {name!r}", what="evaluation", name=name)
    session.delete(row)
    session.flush()


def views(session: Session, rows: Sequence[EvaluationRow]) -> list[Evaluation]:
    """The rows as :class:`Evaluation` views, with one query for the current state of all experts."""
    ids = sorted({e.expert_id for r in rows for e in r.experts if e.expert_id is not None})
    current: dict[int, tuple[str, str]] = {}
    for chunk in chunks(ids, 900):  # stay below SQLite's bound-parameter limit
        stmt = select(ExpertRow.id, ExpertRow.name, ExpertRow.sha256).where(ExpertRow.id.in_(chunk))
        current.update({eid: (n, sha) for eid, n, sha in session.execute(stmt)})
    out = []
    for r in rows:
        experts = []
        for e in r.experts:
            now = current.get(e.expert_id) if e.expert_id is not None else None
            if now is None:
                experts.append(EvalExpert(e.expert_name, e.expert_sha256, None, None, "gone"))
            else:
                status: ExpertStatus = "ok" if now[1] == e.expert_sha256 else "changed"
                experts.append(EvalExpert(e.expert_name, e.expert_sha256, now[0], now[1], status))
        out.append(Evaluation(_record(r), tuple(experts)))
    return out


def _record(row: EvaluationRow) -> EvalRecord:
    return EvalRecord(
        name=row.name,
        base_model=row.base_model,
        query=row.query,
        data_path=row.data_path,
        data_sha256=row.data_sha256,
        examples=row.examples,
        tasks=tuple(row.tasks or ()),
        routers=tuple(row.routers or ()),
        params=dict(row.params or {}),
        experts=tuple(ClusteringInput(e.expert_name, e.expert_sha256) for e in row.experts),
        metrics={
            label: {task: EvalMetrics(**m) for task, m in per.items()}
            for label, per in (row.metrics or {}).items()
        },
        created_at=row.created_at,
    )


def _metrics_json(m: EvalMetrics) -> dict[str, Any]:
    return {
        "examples": m.examples,
        "tokens": m.tokens,
        "loss": m.loss,
        "exact_match": m.exact_match,
        "routing_token": m.routing_token,
        "routing_sequence": m.routing_sequence,
    }


def _ids_by_name(session: Session, names: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for chunk in chunks(sorted(set(names)), 900):
        stmt = select(ExpertRow.name, ExpertRow.id).where(ExpertRow.name.in_(chunk))
        out.update({n: eid for n, eid in session.execute(stmt)})
    return out
