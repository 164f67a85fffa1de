"""Catalog reads and writes of tags and tasks: the named rows, and tagging the experts of a query.

Set-based: tagging n experts is one statement per tag, and naming m tags or tasks two statements,
however large n and m are. The session's owner holds the transaction (see ``catalog/repo.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy import delete, exists, func, insert, literal, select
from sqlalchemy.orm import Session

from libstore.catalog.batches import chunks, pairs
from libstore.catalog.filters import query_condition
from libstore.catalog.models import ExpertRow, ExpertTagRow, TagRow, TaskRow
from libstore.types import ExpertQuery

_Named = TypeVar("_Named", TagRow, TaskRow)


def _named_row(session: Session, table: type[_Named], name: str) -> _Named:
    """The tag or task row named ``name``, created if missing."""
    row = session.scalar(select(table).where(table.name == name))
    if row is None:
        row = table(name=name)
        session.add(row)
        session.flush()
    return row


def tag_row(session: Session, name: str) -> TagRow:
    return _named_row(session, TagRow, name)


def task_row(session: Session, name: str) -> TaskRow:
    return _named_row(session, TaskRow, name)


def ensure_named(
    session: Session, table: type[TagRow] | type[TaskRow], names: Sequence[str]
) -> dict[str, int]:
    """``name -> id`` of the tag or task rows named ``names``, inserting the missing ones (three
    statements per 5,000 names)."""
    have: dict[str, int] = {}
    for part in chunks(names):
        have.update(pairs(session, select(table.name, table.id).where(table.name.in_(part))))
    missing = [n for n in dict.fromkeys(names) if n not in have]
    if missing:
        session.execute(insert(table), [{"name": n} for n in missing])
        for part in chunks(missing):
            have.update(pairs(session, select(table.name, table.id).where(table.name.in_(part))))
    return have


def list_tags(session: Session) -> list[tuple[str, int]]:
    """Every tag with the number of experts carrying it."""
    stmt = (
        select(TagRow.name, func.count(ExpertTagRow.expert_id))
        .outerjoin(ExpertTagRow, ExpertTagRow.tag_id == TagRow.id)
        .group_by(TagRow.name)
        .order_by(TagRow.name)
    )
    return [(name, int(n)) for name, n in session.execute(stmt)]


def add_tags(session: Session, query: ExpertQuery, tags: Sequence[str]) -> None:
    """Tag every expert ``query`` matches with ``tags`` (one statement per tag, however many experts)."""
    cond = query_condition(session, query)
    for tag_id in ensure_named(session, TagRow, tags).values():
        already = exists().where(ExpertTagRow.expert_id == ExpertRow.id, ExpertTagRow.tag_id == tag_id)
        rows = select(ExpertRow.id, literal(tag_id)).where(cond, ~already)
        session.execute(insert(ExpertTagRow).from_select(["expert_id", "tag_id"], rows))
    session.expire_all()


def remove_tags(session: Session, query: ExpertQuery, tags: Sequence[str]) -> None:
    """Take ``tags`` off every expert ``query`` matches (one statement)."""
    tag_ids = select(TagRow.id).where(TagRow.name.in_(tags))
    session.execute(
        delete(ExpertTagRow).where(
            ExpertTagRow.tag_id.in_(tag_ids),
            ExpertTagRow.expert_id.in_(
                select(ExpertRow.id).where(query_condition(session, query)).correlate(None)
            ),
        )
    )
    session.expire_all()
