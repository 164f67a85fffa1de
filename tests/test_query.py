"""The query language: parsing, canonical form, errors."""

from __future__ import annotations

import pytest

from libstore.errors import QueryError
from libstore.ops.query import format_query, parse_query
from libstore.types import ExpertQuery


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ExpertQuery()),
        ("all", ExpertQuery()),
        ("kind=task tag=v1", ExpertQuery(kinds=("task",), tags=("v1",))),
        ("kind=task,cluster kind=general", ExpertQuery(kinds=("task", "cluster", "general"))),
        ("arc_* base=phi3", ExpertQuery(names=("arc_*",), bases=("phi3",))),
        ("name=a task=t1 cluster=mbc:3", ExpertQuery(names=("a",), tasks=("t1",), clusters=("mbc:3",))),
        ("tag=v1 tag=v1", ExpertQuery(tags=("v1",))),
    ],
)
def test_parse(text: str, expected: ExpertQuery) -> None:
    assert parse_query(text) == expected


def test_round_trip() -> None:
    q = parse_query("kind=task,general tag=v1 arc_*")
    assert parse_query(format_query(q)) == q
    assert format_query(ExpertQuery()) == "all"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour=red", "unknown query field 'colour'"),
        ("kind=", "empty value"),
        ("kind=lora", "unknown kind 'lora'"),
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(QueryError, match=message):
        parse_query(text)


# --- name globs: one semantics on SQLite, PostgreSQL and in memory (push/pull selection) -------------

GLOB_NAMES = ["ARC_x", "Arc_easy", "arcXeasy", "arc_challenge", "arc_easy", "e1", "e10", "e2"]
GLOB_CASES = [
    ("Arc_*", ["Arc_easy"]),
    ("arc_*", ["arc_challenge", "arc_easy"]),  # '_' is itself, not LIKE's "any character"
    ("?rc_easy", ["Arc_easy", "arc_easy"]),
    ("*_easy", ["Arc_easy", "arc_easy"]),
    ("e1?", ["e10"]),
    ("e?", ["e1", "e2"]),
    ("e1", ["e1"]),
    ("ARC*", ["ARC_x"]),
    ("arc%", []),  # '%' is itself too
    ("*", GLOB_NAMES),
]


@pytest.fixture(scope="module")
def glob_library(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One library per backend holding GLOB_NAMES (one adapter stored under every name)."""
    from libstore import Library
    from tests.conftest import _pg_schema_url
    from tests.factories import make_adapter, make_base_model

    root = tmp_path_factory.mktemp("globs")
    base = make_base_model(root / "base")
    adapter = make_adapter(base, root / "adapter", seed=1)
    pg = _pg_schema_url()
    libs = {}
    for backend, url in (("sqlite", None), ("postgres", next(pg))):
        lib = Library.init(root / backend, db_url=url)
        lib.add_base("tiny", str(base))
        for name in GLOB_NAMES:
            lib.add(adapter, name=name)
        libs[backend] = lib
    yield libs
    for lib in libs.values():
        lib.close()
    pg.close()


def _entry(name: str):  # type: ignore[no-untyped-def]
    from libstore.types import Expert

    return Expert(
        name=name,
        kind="task",
        base_model="tiny",
        rank=4,
        alpha=8.0,
        use_rslora=False,
        target_modules=("q_proj",),
        modules={},
        dtype="float32",
        sha256="0" * 64,
        bytes=0,
        files=(),
    )


@pytest.mark.parametrize(("pattern", "expected"), GLOB_CASES)
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres), "memory"]
)
def test_name_globs_mean_the_same_everywhere(
    glob_library, backend: str, pattern: str, expected: list[str]
) -> None:  # type: ignore[no-untyped-def]
    """Case-sensitive, ``*`` and ``?`` only: the catalog on both databases and the in-memory matcher
    that push/pull selection uses (``hub.plan.matches``) agree on every pattern."""
    if backend == "memory":
        from libstore.hub.plan import matches
        from libstore.types import glob_match

        query = parse_query(pattern)
        got = [n for n in GLOB_NAMES if matches(_entry(n), query)]
        assert got == [n for n in GLOB_NAMES if glob_match(pattern, n)]
    else:
        got = [e.name for e in glob_library[backend].experts(pattern)]
        assert got == [e.name for e in glob_library[backend].experts(f"name={pattern}")]
    assert got == expected


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_untag_glob_hits_the_same_experts_on_both_databases(glob_library, backend: str) -> None:  # type: ignore[no-untyped-def]
    lib = glob_library[backend]
    assert lib.tag("*", "all") == sorted(GLOB_NAMES)
    assert lib.untag("Arc_*", "all") == ["Arc_easy"]
    assert [e.name for e in lib.experts("tag=all")] == [n for n in GLOB_NAMES if n != "Arc_easy"]
    lib.untag("*", "all")


@pytest.mark.parametrize("pattern", ["arc_[ab]*", "x]"])
def test_character_classes_are_refused(pattern: str) -> None:
    with pytest.raises(QueryError) as e:
        parse_query(pattern)
    assert e.value.query == pattern
    with pytest.raises(QueryError):
        ExpertQuery(names=(pattern,))


@pytest.mark.parametrize(
    "text",
    [
        "cluster=x:99999999999999999999999",
        "cluster=x:2147483648",
        "cluster=x:-1",
        "cluster=x:",
        "cluster=x:²",
    ],
)
def test_cluster_index_out_of_range_is_a_query_error(text: str) -> None:
    with pytest.raises(QueryError) as e:
        parse_query(text)
    assert e.value.query == text
    with pytest.raises(QueryError):
        ExpertQuery(clusters=(text.partition("=")[2],))


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_huge_cluster_index_in_the_api_changes_nothing(glob_library, backend: str) -> None:  # type: ignore[no-untyped-def]
    lib = glob_library[backend]
    with pytest.raises(QueryError):
        lib.experts("cluster=x:99999999999999999999999")
    assert lib.experts("cluster=x:2147483647") == []  # the largest index a catalog can hold
    assert len(lib.experts()) == len(GLOB_NAMES)


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_prefix_glob_is_served_by_the_name_index(glob_library, backend: str) -> None:  # type: ignore[no-untyped-def]
    """``ls 'e09*'`` must stay fast at 100k experts: the plan searches the name index by range.

    SQLite's ``LIKE`` is case-insensitive and cannot use a ``BINARY`` index; ``GLOB`` can. PostgreSQL's
    ``LIKE`` can only where the name is ``C``-collated (migration 0002).
    """
    from sqlalchemy import text

    from libstore.catalog.reads import query_where
    from libstore.types import ExpertQuery

    lib = glob_library[backend]
    with lib.context.catalog.read() as s:
        where = query_where(ExpertQuery(names=("e1*",)), s.get_bind().dialect.name)
        stmt = text(f"SELECT experts.id FROM experts WHERE {where.sql}").bindparams(**where.params)
        sql = str(stmt.compile(dialect=s.get_bind().dialect, compile_kwargs={"literal_binds": True}))
        if backend == "sqlite":
            plan = " ".join(str(r[-1]) for r in s.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
            assert "SEARCH experts USING COVERING INDEX" in plan and "name>? AND name<?" in plan, plan
        else:
            s.execute(text("SET LOCAL enable_seqscan = off"))
            plan = " ".join(r[0] for r in s.execute(text(f"EXPLAIN {sql}")))
            assert "uq_experts_name" in plan and "Index Cond" in plan and ">=" in plan, plan
        names = s.execute(text(f"SELECT experts.name FROM experts WHERE {where.sql}"), dict(where.params))
        assert sorted(n for (n,) in names) == ["e1", "e10"]
