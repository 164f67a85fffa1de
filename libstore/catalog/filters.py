"""The catalog query language in SQL: the WHERE clause an :class:`ExpertQuery` stands for.

``ops/query.py`` parses the text, :class:`ExpertQuery` checks itself and owns the name-glob semantics
(``types.glob_match``, used in memory by push/pull selection); this module says the same in SQL on
each backend. Every filter is an uncorrelated ``IN`` subquery, so the condition can be put on any
statement over ``experts`` (listing, tagging, counting) and stays index-friendly.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import ColumnElement, Select, and_, or_, select, true
from sqlalchemy.orm import Session

from libstore.catalog.models import (
    BaseModelRow,
    ClusteringRow,
    ClusterRow,
    ExpertRow,
    ExpertTagRow,
    ExpertTaskRow,
    TagRow,
    TaskRow,
)
from libstore.types import ExpertQuery, is_glob, parse_cluster_ref


def _like_pattern(glob: str) -> str:
    """A name glob as a ``LIKE`` pattern with backslash escapes (PostgreSQL's default escape)."""
    out = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return out.replace("*", "%").replace("?", "_")


def name_condition(session: Session, patterns: Sequence[str]) -> ColumnElement[bool]:
    """SQL for "the name matches one of ``patterns``", with :func:`libstore.types.glob_match`'s
    semantics on every backend: case-sensitive; ``*`` any run, ``?`` one character.

    SQLite's ``LIKE`` ignores case, so SQLite gets ``GLOB`` (case-sensitive; ``[`` never reaches it,
    :class:`ExpertQuery` refuses classes); PostgreSQL gets ``LIKE``. Both use the name index for a
    literal prefix (``e09*``): SQLite's ``GLOB`` on a ``BINARY`` column, PostgreSQL's ``LIKE`` on the
    ``C``-collated name (migration 0002).
    """
    exact = [p for p in patterns if not is_glob(p)]
    conds: list[ColumnElement[bool]] = [ExpertRow.name.in_(exact)] if exact else []
    sqlite = session.get_bind().dialect.name == "sqlite"
    for p in patterns:
        if is_glob(p):
            conds.append(ExpertRow.name.op("GLOB")(p) if sqlite else ExpertRow.name.like(_like_pattern(p)))
    return or_(*conds)


def query_condition(session: Session, query: ExpertQuery) -> ColumnElement[bool]:
    """The WHERE clause selecting the experts ``query`` matches (filters are uncorrelated ``IN``
    subqueries, so it can be put on any statement over ``experts``)."""
    conds: list[ColumnElement[bool]] = []
    if query.names:
        conds.append(name_condition(session, query.names))
    if query.kinds:
        conds.append(ExpertRow.kind.in_(query.kinds))
    if query.bases:
        bases = select(BaseModelRow.id).where(BaseModelRow.name.in_(query.bases)).correlate(None)
        conds.append(ExpertRow.base_model_id.in_(bases))
    if query.tags:
        tagged = (
            select(ExpertTagRow.expert_id)
            .join(TagRow, TagRow.id == ExpertTagRow.tag_id)
            .where(TagRow.name.in_(query.tags))
            .correlate(None)
        )
        conds.append(ExpertRow.id.in_(tagged))
    if query.tasks:
        on_task = (
            select(ExpertTaskRow.expert_id)
            .join(TaskRow, TaskRow.id == ExpertTaskRow.task_id)
            .where(TaskRow.name.in_(query.tasks))
            .correlate(None)
        )
        conds.append(ExpertRow.id.in_(on_task))
    if query.clusters:
        refs = []
        for ref in query.clusters:
            name, index = parse_cluster_ref(ref)
            cond = ClusteringRow.name == name
            refs.append(cond if index is None else cond & (ClusterRow.index == index))
        clusters = (
            select(ClusterRow.id)
            .join(ClusteringRow, ClusteringRow.id == ClusterRow.clustering_id)
            .where(or_(*refs))
            .correlate(None)
        )
        conds.append(ExpertRow.cluster_id.in_(clusters))
    return and_(*conds) if conds else true()


def query_statement(session: Session, query: ExpertQuery) -> Select[ExpertRow]:
    """The rows ``query`` matches, in name order (for catalog modules that join further)."""
    return select(ExpertRow).where(query_condition(session, query)).order_by(ExpertRow.name)
