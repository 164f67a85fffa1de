"""Statements over many names: ``IN (...)`` lists cut to a size both databases bind, and two-column
results as dicts."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

#: Names per ``IN (...)`` list: well under SQLite's and PostgreSQL's bound-parameter limits.
IN_CHUNK = 5000

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


def chunks(items: Sequence[T], size: int = IN_CHUNK) -> Iterable[Sequence[T]]:
    return (items[i : i + size] for i in range(0, len(items), size))


def pairs(session: Session, stmt: Select[K, V]) -> dict[K, V]:
    """A two-column statement's rows as a dict."""
    return {k: v for k, v in session.execute(stmt)}
