"""The catalog query language as a SQLAlchemy condition, for statements that change or count experts.

``ops/query.py`` parses the text, :class:`ExpertQuery` checks itself and owns the name-glob semantics
(``types.glob_match``, used in memory by push/pull selection); ``catalog/reads.py`` says the same in
SQL (:func:`libstore.catalog.reads.query_where`, the one rendering), which this wraps so that any
statement over ``experts`` (tagging, counting, clustering inputs) can carry it.
"""

from __future__ import annotations

from sqlalchemy import Select, TextClause, select, text
from sqlalchemy.orm import Session

from libstore.catalog.models import ExpertRow
from libstore.catalog.reads import query_where
from libstore.types import ExpertQuery


def query_condition(session: Session, query: ExpertQuery) -> TextClause:
    """The WHERE clause selecting the experts ``query`` matches, on ``experts``."""
    where = query_where(query, session.get_bind().dialect.name)
    return text(where.sql).bindparams(**where.params)


def query_statement(session: Session, query: ExpertQuery) -> Select[ExpertRow]:
    """The rows ``query`` matches, in name order (for catalog modules that join further)."""
    return select(ExpertRow).where(query_condition(session, query)).order_by(ExpertRow.name)
