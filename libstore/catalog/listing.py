"""Listing experts at scale: ordered, paged, as summaries or full records, in constant statements.

A listing is one statement for the page of experts (filter, order, ``LIMIT``/``OFFSET`` in SQL), then
one per linked table restricted to that page by an uncorrelated ``IN (SELECT id ... LIMIT ...)``, so
its cost does not depend on how many experts there are, only on how many are shown. Summaries read
no JSON column (module shapes, files, metadata), which is most of a full record's cost.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, select
from sqlalchemy.orm import Session

from libstore.catalog.filters import query_condition
from libstore.catalog.loading import load_experts, names_by_expert
from libstore.catalog.models import (
    BaseModelRow,
    ClusteringRow,
    ClusterRow,
    DerivationRow,
    ExpertRow,
    ExpertTagRow,
    ExpertTaskRow,
    TagRow,
    TaskRow,
)
from libstore.types import Expert, ExpertQuery, ExpertSort, ExpertSummary

_SORT_COLUMNS: dict[str, Any] = {
    "name": ExpertRow.name,
    "created": ExpertRow.created_at,
    "size": ExpertRow.bytes,
    "rank": ExpertRow.rank,
    "kind": ExpertRow.kind,
}


def _order(sort: ExpertSort, descending: bool) -> list[ColumnElement[Any]]:
    """``sort``'s column, then the name (unique) so pages never overlap."""
    cols = [_SORT_COLUMNS[sort]] + ([ExpertRow.name] if sort != "name" else [])
    return [c.desc() if descending else c.asc() for c in cols]


def page_ids(
    session: Session, query: ExpertQuery, sort: ExpertSort, descending: bool, limit: int | None, offset: int
) -> Select[int]:
    """The ids of the page of experts ``query`` matches, as a subquery the linked tables filter by
    (what ``tests/test_catalog_indexes.py`` EXPLAINs)."""
    stmt = select(ExpertRow.id).where(query_condition(session, query)).order_by(*_order(sort, descending))
    return stmt.limit(limit).offset(offset or None).correlate(None)


def _selection(
    session: Session, query: ExpertQuery, sort: ExpertSort, descending: bool, limit: int | None, offset: int
) -> tuple[ColumnElement[bool], Select[int]]:
    """The condition on ``experts`` and the id subquery for the linked tables: the query's own
    condition when the whole result is wanted (no ordered subquery to sort again per table), the
    page's ids otherwise."""
    if limit is None and not offset:
        cond = query_condition(session, query)
        return cond, select(ExpertRow.id).where(cond).correlate(None)
    ids = page_ids(session, query, sort, descending, limit, offset)
    return ExpertRow.id.in_(ids), ids


def list_experts(
    session: Session,
    query: ExpertQuery,
    *,
    sort: ExpertSort = "name",
    descending: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> list[Expert]:
    """Full records of a page of the experts ``query`` matches (``repo.load_experts``'s statements)."""
    cond, _ = _selection(session, query, sort, descending, limit, offset)
    return load_experts(session, cond, order=_order(sort, descending))


def list_summaries(
    session: Session,
    query: ExpertQuery,
    *,
    sort: ExpertSort = "name",
    descending: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> list[ExpertSummary]:
    """Summaries of a page of the experts ``query`` matches: four statements, however many."""
    cond, ids = _selection(session, query, sort, descending, limit, offset)
    rows = session.execute(
        select(
            ExpertRow.id,
            ExpertRow.name,
            ExpertRow.kind,
            BaseModelRow.name,
            ExpertRow.rank,
            ExpertRow.alpha,
            ExpertRow.use_rslora,
            ExpertRow.dtype,
            ExpertRow.sha256,
            ExpertRow.bytes,
            ClusteringRow.name,
            ClusterRow.index,
            DerivationRow.method,
            ExpertRow.created_at,
        )
        .join(BaseModelRow, BaseModelRow.id == ExpertRow.base_model_id)
        .outerjoin(ClusterRow, ClusterRow.id == ExpertRow.cluster_id)
        .outerjoin(ClusteringRow, ClusteringRow.id == ClusterRow.clustering_id)
        .outerjoin(DerivationRow, DerivationRow.child_id == ExpertRow.id)
        .where(cond)
        .order_by(*_order(sort, descending))
    ).all()
    if not rows:
        return []
    tags = names_by_expert(session, ExpertTagRow.expert_id, ExpertTagRow.tag_id, TagRow, ids)
    tasks = names_by_expert(session, ExpertTaskRow.expert_id, ExpertTaskRow.task_id, TaskRow, ids)
    return [
        ExpertSummary(
            name=name,
            kind=kind,
            base_model=base,
            rank=rank,
            alpha=alpha,
            use_rslora=rslora,
            dtype=dtype,
            sha256=sha,
            bytes=size,
            tasks=tuple(tasks[eid]),
            tags=tuple(tags[eid]),
            cluster=None if clustering is None else f"{clustering}:{index}",
            derived_by=method,
            created_at=created,
        )
        for (
            eid,
            name,
            kind,
            base,
            rank,
            alpha,
            rslora,
            dtype,
            sha,
            size,
            clustering,
            index,
            method,
            created,
        ) in rows
    ]
