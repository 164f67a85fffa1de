"""Every filter of the query language, and the listing sorts, use an index (EXPLAIN on both databases).

The statement explained is the listing's own page statement (``catalog.reads.Page.ids``), so
what is checked is what ``ls`` runs. PostgreSQL plans with ``enable_seqscan = off`` (a few thousand
rows are otherwise cheaper to scan): the check is that an index *applies*, which is what matters
at 100,000 experts. SQLite's plan has no cost model to switch off and must pick the index itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from libstore import Library
from libstore.catalog.reads import Page, query_where
from libstore.ops.query import parse_query
from tests.catalog_support import clone_experts
from tests.factories import make_adapter

#: (query, sort, descending, limit, the indexes the plan must name); ``uq:TABLE`` is the unique
#: index on TABLE.name (SQLite calls it ``sqlite_autoindex_TABLE_1``, PostgreSQL ``uq_TABLE_name``)
CASES = [
    ("e009*", "name", False, None, ["uq:experts"]),
    ("e00042", "name", False, None, ["uq:experts"]),
    ("kind=merged", "name", False, None, ["ix_experts_kind"]),
    ("base=tiny", "name", False, None, ["uq:base_models", "ix_experts_base_kind"]),
    ("tag=g3", "name", False, None, ["uq:tags", "ix_expert_tags_tag_id"]),
    ("task=task_e00042", "name", False, None, ["uq:tasks", "ix_expert_tasks_task_id"]),
    ("cluster=mbc_e:0", "name", False, None, ["uq:clusterings", "ix_experts_cluster_id"]),
    ("", "name", False, 20, ["uq:experts"]),
    ("", "created", True, 20, ["ix_experts_created_at"]),
    ("", "size", True, 20, ["ix_experts_bytes"]),
]


@pytest.fixture
def big(library: Library, base_dir: Path, tmp_path: Path) -> Library:
    library.add(make_adapter(base_dir, tmp_path / "a", seed=1), name="proto")
    clone_experts(library, "proto", 3000)
    return library


def _plan(lib: Library, query: str, sort: str, descending: bool, limit: int | None) -> str:
    with lib.context.catalog.read() as s:
        dialect = s.get_bind().dialect
        page = Page(query_where(parse_query(query), dialect.name), sort, descending, limit)  # type: ignore[arg-type]
        stmt = text(page.ids(dialect.name)).bindparams(**page.where.params)
        sql = str(stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
        if s.get_bind().dialect.name == "sqlite":
            return "\n".join(str(r[-1]) for r in s.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
        s.execute(text("SET LOCAL enable_seqscan = off"))
        return "\n".join(str(r[0]) for r in s.execute(text(f"EXPLAIN {sql}")))


@pytest.mark.parametrize(("query", "sort", "descending", "limit", "indexes"), CASES)
def test_listing_filters_and_sorts_use_an_index(
    big: Library, query: str, sort: str, descending: bool, limit: int | None, indexes: list[str]
) -> None:
    plan = _plan(big, query, sort, descending, limit)
    sqlite = big.context.catalog.is_sqlite
    for index in indexes:
        if index.startswith("uq:"):
            table = index[3:]
            index = f"sqlite_autoindex_{table}_1" if sqlite else f"uq_{table}_name"
        assert index in plan, plan
    lines = plan.splitlines()
    if sqlite:  # no full scan of the experts table: a SEARCH, or a SCAN in an index's order
        assert not [x for x in lines if x.startswith("SCAN experts") and "INDEX" not in x], plan
    else:
        assert not [x for x in lines if "Seq Scan on experts" in x], plan
