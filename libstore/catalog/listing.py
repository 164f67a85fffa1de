"""Listing experts at scale: ordered, paged, as summaries or full records, in constant statements
(``catalog/reads.py``'s statements, run in the catalog's transaction)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from libstore.catalog import reads
from libstore.types import Expert, ExpertQuery, ExpertSort, ExpertSummary


def list_experts(
    session: Session,
    query: ExpertQuery,
    *,
    sort: ExpertSort = "name",
    descending: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> list[Expert]:
    """Full records of a page of the experts ``query`` matches."""
    db = reads.of_session(session)
    where = reads.query_where(query, db.dialect)
    return reads.experts(db, reads.Page(where, sort, descending, limit, offset))


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
    db = reads.of_session(session)
    where = reads.query_where(query, db.dialect)
    return reads.summaries(db, reads.Page(where, sort, descending, limit, offset))
