"""Loading full expert records (files, tags, tasks, cluster, lineage) in a constant number of
statements: one for the experts, then one per linked table restricted by the same condition."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from libstore.catalog.models import (
    BaseModelRow,
    ClusteringRow,
    ClusterRow,
    ExpertFileRow,
    ExpertRow,
    ExpertTagRow,
    ExpertTaskRow,
    TagRow,
    TaskRow,
)
from libstore.types import Expert, ModuleShape, StoredFile

_EXPERT_COLUMNS = (
    ExpertRow.id,
    ExpertRow.name,
    ExpertRow.kind,
    BaseModelRow.name.label("base"),
    ExpertRow.rank,
    ExpertRow.alpha,
    ExpertRow.use_rslora,
    ExpertRow.target_modules,
    ExpertRow.module_shapes,
    ExpertRow.dtype,
    ExpertRow.sha256,
    ExpertRow.bytes,
    ExpertRow.source,
    ExpertRow.extra,
    ExpertRow.created_at,
    ClusteringRow.name.label("clustering"),
    ClusterRow.index.label("cluster_index"),
)


def load_experts(
    session: Session,
    cond: ColumnElement[bool],
    *,
    with_lineage: bool = True,
    order: Sequence[Any] = (),
) -> list[Expert]:
    """The experts ``cond`` selects, with files, tags, tasks, cluster and lineage: 1 statement for the
    experts, then one per linked table (the ``IN (SELECT id ...)`` repeats ``cond``), never one per
    expert. Callers read inside one transaction, so every statement sees the same snapshot."""
    stmt = (
        select(*_EXPERT_COLUMNS)
        .join(BaseModelRow, BaseModelRow.id == ExpertRow.base_model_id)
        .outerjoin(ClusterRow, ClusterRow.id == ExpertRow.cluster_id)
        .outerjoin(ClusteringRow, ClusteringRow.id == ClusterRow.clustering_id)
        .where(cond)
        .order_by(*(order or [ExpertRow.name]))
    )
    rows = session.execute(stmt).all()
    if not rows:
        return []
    ids = select(ExpertRow.id).where(cond).correlate(None)
    files: dict[int, list[StoredFile]] = defaultdict(list)
    for eid, path, sha, size in session.execute(
        select(ExpertFileRow.expert_id, ExpertFileRow.path, ExpertFileRow.blob_sha256, ExpertFileRow.size)
        .where(ExpertFileRow.expert_id.in_(ids))
        .order_by(ExpertFileRow.expert_id, ExpertFileRow.path)
    ):
        files[eid].append(StoredFile(path, sha, size))
    tags = names_by_expert(session, ExpertTagRow.expert_id, ExpertTagRow.tag_id, TagRow, ids)
    tasks = names_by_expert(session, ExpertTaskRow.expert_id, ExpertTaskRow.task_id, TaskRow, ids)
    from libstore.catalog.derivations import by_expert_id  # that module builds on the repo, which uses this

    lineage = by_expert_id(session, ids) if with_lineage else {}
    return [
        Expert(
            name=r.name,
            kind=r.kind,
            base_model=r.base,
            rank=r.rank,
            alpha=r.alpha,
            use_rslora=r.use_rslora,
            target_modules=tuple(r.target_modules),
            modules={k: ModuleShape(*v) for k, v in r.module_shapes.items()},
            dtype=r.dtype,
            sha256=r.sha256,
            bytes=r.bytes,
            files=tuple(files[r.id]),
            source=r.source,
            tasks=tuple(tasks[r.id]),
            tags=tuple(tags[r.id]),
            cluster=None if r.clustering is None else f"{r.clustering}:{r.cluster_index}",
            metadata=dict(r.extra or {}),
            lineage=lineage.get(r.id),
            created_at=r.created_at,
        )
        for r in rows
    ]


def names_by_expert(
    session: Session,
    expert_id: InstrumentedAttribute[int],
    named_id: InstrumentedAttribute[int],
    named: type[TagRow] | type[TaskRow],
    ids: Select[int],
) -> dict[int, list[str]]:
    """``expert id -> names`` of its tags or tasks (one statement over a link table)."""
    out: dict[int, list[str]] = defaultdict(list)
    stmt = (
        select(expert_id, named.name)
        .join(named, named.id == named_id)
        .where(expert_id.in_(ids))
        .order_by(expert_id, named.name)
    )
    for eid, name in session.execute(stmt):
        out[eid].append(name)
    return out
