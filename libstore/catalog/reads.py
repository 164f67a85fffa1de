"""Reading experts in plain SQL: the query language as a WHERE clause, and summaries and full records
in a constant number of statements, from any DB-API-like connection.

Why plain SQL: ``ls`` and ``show`` must answer in a fraction of a second, and importing SQLAlchemy
alone costs about as much. These statements are the only ones that read expert records: the catalog
runs them through its SQLAlchemy session (:func:`of_session`), ``libstore ls``/``show`` through the
database's own driver (``sqlite3`` or ``psycopg``, ``catalog/snapshots.py``), and both get the same
records. Parameters are named (``:w3_0``), the style SQLAlchemy's ``text()`` and ``sqlite3`` share
(the PostgreSQL snapshot rewrites them as ``%(w3_0)s``); the values are the driver's own (SQLite:
JSON as text, timestamps as text, booleans as 0/1), read back by :func:`json_value` and
:func:`timestamp`.

A listing is one statement for the page of experts (filter, order, ``LIMIT``/``OFFSET``), then one
per linked table restricted to that page by an uncorrelated ``IN (SELECT id ...)``: its cost depends
on how many experts are shown, never on how many there are.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from libstore.types import (
    Derivation,
    DerivationParent,
    Expert,
    ExpertQuery,
    ExpertSort,
    ExpertSummary,
    ModuleShape,
    StoredFile,
    is_glob,
    parse_cluster_ref,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

#: Runs one statement with named parameters and returns its rows.
Rows = Callable[[str, Mapping[str, Any]], Sequence[Sequence[Any]]]

_where_ids = itertools.count()


@dataclass(frozen=True)
class Reader:
    """A transaction to read from: how to run a statement, and the SQL dialect it speaks."""

    rows: Rows
    dialect: str


@dataclass(frozen=True)
class Where:
    """A condition on ``experts`` and its parameters (names unique per condition, so conditions
    can be combined in one statement)."""

    sql: str
    params: Mapping[str, Any]


class _Params:
    def __init__(self) -> None:
        self.prefix = f"w{next(_where_ids)}_"
        self.values: dict[str, Any] = {}

    def one(self, value: Any) -> str:
        key = f"{self.prefix}{len(self.values)}"
        self.values[key] = value
        return f":{key}"

    def many(self, values: Iterable[Any]) -> str:
        return ", ".join(self.one(v) for v in values)


def like_pattern(glob: str) -> str:
    """A name glob as a ``LIKE`` pattern with backslash escapes (PostgreSQL's default escape)."""
    out = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return out.replace("*", "%").replace("?", "_")


def _names(patterns: Sequence[str], dialect: str, p: _Params) -> str:
    """ "The name matches one of ``patterns``" with :func:`libstore.types.glob_match`'s semantics on
    every backend: case-sensitive; ``*`` any run, ``?`` one character.

    SQLite's ``LIKE`` ignores case, so SQLite gets ``GLOB`` (case-sensitive; ``[`` never reaches it,
    :class:`ExpertQuery` refuses classes); PostgreSQL gets ``LIKE``. Both use the name index for a
    literal prefix (``e09*``): SQLite's ``GLOB`` on a ``BINARY`` column, PostgreSQL's ``LIKE`` on the
    ``C``-collated name (migration 0002).
    """
    exact = [n for n in patterns if not is_glob(n)]
    conds = [f"experts.name IN ({p.many(exact)})"] if exact else []
    for n in patterns:
        if is_glob(n):
            if dialect == "sqlite":
                conds.append(f"experts.name GLOB {p.one(n)}")
            else:
                conds.append(f"experts.name LIKE {p.one(like_pattern(n))}")
    return " OR ".join(conds)


def query_where(query: ExpertQuery, dialect: str) -> Where:
    """The condition selecting the experts ``query`` matches: every filter an uncorrelated ``IN``
    subquery, so it fits any statement over ``experts`` and stays index-friendly."""
    p = _Params()
    conds: list[str] = []
    if query.names:
        conds.append(_names(query.names, dialect, p))
    if query.kinds:
        conds.append(f"experts.kind IN ({p.many(query.kinds)})")
    if query.bases:
        conds.append(
            "experts.base_model_id IN (SELECT base_models.id FROM base_models "
            f"WHERE base_models.name IN ({p.many(query.bases)}))"
        )
    if query.tags:
        conds.append(
            "experts.id IN (SELECT expert_tags.expert_id FROM expert_tags JOIN tags ON tags.id = "
            f"expert_tags.tag_id WHERE tags.name IN ({p.many(query.tags)}))"
        )
    if query.tasks:
        conds.append(
            "experts.id IN (SELECT expert_tasks.expert_id FROM expert_tasks JOIN tasks ON tasks.id = "
            f"expert_tasks.task_id WHERE tasks.name IN ({p.many(query.tasks)}))"
        )
    if query.clusters:
        refs = []
        for ref in query.clusters:
            name, index = parse_cluster_ref(ref)
            cond = f"clusterings.name = {p.one(name)}"
            refs.append(cond if index is None else f'({cond} AND clusters."index" = {p.one(index)})')
        conds.append(
            "experts.cluster_id IN (SELECT clusters.id FROM clusters JOIN clusterings ON clusterings.id "
            f"= clusters.clustering_id WHERE {' OR '.join(refs)})"
        )
    return Where(" AND ".join(f"({c})" for c in conds) or "1 = 1", p.values)


def name_is(name: str) -> Where:
    """The one expert named ``name``."""
    p = _Params()
    return Where(f"experts.name = {p.one(name)}", p.values)


_SORT_COLUMNS: dict[str, str] = {
    "name": "experts.name",
    "created": "experts.created_at",
    "size": "experts.bytes",
    "rank": "experts.rank",
    "kind": "experts.kind",
}


def order_by(sort: ExpertSort, descending: bool) -> str:
    """``sort``'s column, then the name (unique) so pages never overlap."""
    cols = [_SORT_COLUMNS[sort]] + (["experts.name"] if sort != "name" else [])
    return ", ".join(f"{c} {'DESC' if descending else 'ASC'}" for c in cols)


@dataclass(frozen=True)
class Page:
    """Which experts a read shows: the condition, the order and the slice."""

    where: Where
    sort: ExpertSort = "name"
    descending: bool = False
    limit: int | None = None
    offset: int = 0

    def ids(self, dialect: str) -> str:
        """The ids of the page's experts, as the subquery the linked tables filter by (what
        ``tests/test_catalog_indexes.py`` EXPLAINs): the condition alone when the whole result is
        wanted (no ordered subquery to sort again per table)."""
        base = f"SELECT experts.id FROM experts WHERE {self.where.sql}"
        if self.limit is None and not self.offset:
            return base
        limit = (
            f" LIMIT {int(self.limit)}"
            if self.limit is not None
            else (" LIMIT -1" if dialect == "sqlite" else "")
        )
        offset = f" OFFSET {int(self.offset)}" if self.offset else ""
        return f"{base} ORDER BY {order_by(self.sort, self.descending)}{limit}{offset}"

    def condition(self, dialect: str) -> str:
        if self.limit is None and not self.offset:
            return self.where.sql
        return f"experts.id IN ({self.ids(dialect)})"


def list_summaries(
    db: Reader,
    query: ExpertQuery,
    *,
    sort: ExpertSort = "name",
    descending: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> list[ExpertSummary]:
    """Summaries of a page of the experts ``query`` matches (:func:`summaries`)."""
    return summaries(db, Page(query_where(query, db.dialect), sort, descending, limit, offset))


def list_experts(
    db: Reader,
    query: ExpertQuery,
    *,
    sort: ExpertSort = "name",
    descending: bool = False,
    limit: int | None = None,
    offset: int = 0,
    with_lineage: bool = True,
) -> list[Expert]:
    """Full records of a page of the experts ``query`` matches (:func:`experts`)."""
    page = Page(query_where(query, db.dialect), sort, descending, limit, offset)
    return experts(db, page, with_lineage=with_lineage)


def json_value(value: Any) -> Any:
    """A JSON column's value: SQLite returns the text, PostgreSQL's driver the parsed value."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def timestamp(value: Any) -> dt.datetime | None:
    """A timestamp column's value, timezone-aware UTC (SQLite returns naive text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    assert isinstance(value, dt.datetime), value
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


_JOINS = (
    "FROM experts JOIN base_models ON base_models.id = experts.base_model_id "
    "LEFT OUTER JOIN clusters ON clusters.id = experts.cluster_id "
    "LEFT OUTER JOIN clusterings ON clusterings.id = clusters.clustering_id"
)


def summaries(db: Reader, page: Page) -> list[ExpertSummary]:
    """Summaries of the page's experts: no JSON column read (module shapes, files, metadata are most
    of a full record's cost), four statements however many."""
    rows, dialect = db.rows, db.dialect
    found = rows(
        "SELECT experts.id, experts.name, experts.kind, base_models.name, experts.rank, experts.alpha, "
        "experts.use_rslora, experts.dtype, experts.sha256, experts.bytes, clusterings.name, "
        f'clusters."index", derivations.method, experts.created_at {_JOINS} '
        "LEFT OUTER JOIN derivations ON derivations.child_id = experts.id "
        f"WHERE {page.condition(dialect)} ORDER BY {order_by(page.sort, page.descending)}",
        page.where.params,
    )
    if not found:
        return []
    ids = page.ids(dialect)
    tags = _names_by_expert(rows, "expert_tags", "tag_id", "tags", ids, page.where.params)
    tasks = _names_by_expert(rows, "expert_tasks", "task_id", "tasks", ids, page.where.params)
    return [
        ExpertSummary(
            name=name,
            kind=kind,
            base_model=base,
            rank=rank,
            alpha=alpha,
            use_rslora=bool(rslora),
            dtype=dtype,
            sha256=sha,
            bytes=size,
            tasks=tuple(tasks[eid]),
            tags=tuple(tags[eid]),
            cluster=None if clustering is None else f"{clustering}:{index}",
            derived_by=method,
            created_at=timestamp(created),
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
        ) in found
    ]


def experts(db: Reader, page: Page, *, with_lineage: bool = True) -> list[Expert]:
    """Full records of the page's experts with files, tags, tasks, cluster and lineage: one statement
    for the experts, then one per linked table, never one per expert. Callers read inside one
    transaction, so every statement sees the same snapshot."""
    params = page.where.params
    rows, dialect = db.rows, db.dialect
    found = rows(
        "SELECT experts.id, experts.name, experts.kind, base_models.name, experts.rank, experts.alpha, "
        "experts.use_rslora, experts.target_modules, experts.module_shapes, experts.dtype, "
        "experts.sha256, experts.bytes, experts.source, experts.metadata, experts.created_at, "
        f'clusterings.name, clusters."index" {_JOINS} '
        f"WHERE {page.condition(dialect)} ORDER BY {order_by(page.sort, page.descending)}",
        params,
    )
    if not found:
        return []
    ids = page.ids(dialect)
    files: dict[int, list[StoredFile]] = defaultdict(list)
    for eid, path, sha, size in rows(
        "SELECT expert_files.expert_id, expert_files.path, expert_files.blob_sha256, expert_files.size "
        f"FROM expert_files WHERE expert_files.expert_id IN ({ids}) "
        "ORDER BY expert_files.expert_id, expert_files.path",
        params,
    ):
        files[eid].append(StoredFile(path, sha, size))
    tags = _names_by_expert(rows, "expert_tags", "tag_id", "tags", ids, params)
    tasks = _names_by_expert(rows, "expert_tasks", "task_id", "tasks", ids, params)
    lineage = _lineage(rows, ids, params) if with_lineage else {}
    shapes = _Shapes()
    return [
        Expert(
            name=name,
            kind=kind,
            base_model=base,
            rank=rank,
            alpha=alpha,
            use_rslora=bool(rslora),
            target_modules=shapes.targets(targets),
            modules=shapes.modules(module_shapes),
            dtype=dtype,
            sha256=sha,
            bytes=size,
            files=tuple(files[eid]),
            source=source,
            tasks=tuple(tasks[eid]),
            tags=tuple(tags[eid]),
            cluster=None if clustering is None else f"{clustering}:{index}",
            metadata=dict(json_value(meta) or {}),
            lineage=lineage.get(eid),
            created_at=timestamp(created),
        )
        for (
            eid,
            name,
            kind,
            base,
            rank,
            alpha,
            rslora,
            targets,
            module_shapes,
            dtype,
            sha,
            size,
            source,
            meta,
            created,
            clustering,
            index,
        ) in found
    ]


class _Shapes:
    """Module shapes and targets decoded once per distinct text: the experts of a library share a
    few (one base, a few target sets), and decoding JSON is most of reading a full record. Each
    expert still gets its own ``modules`` dict (of frozen shapes)."""

    def __init__(self) -> None:
        self._modules: dict[Any, dict[str, ModuleShape]] = {}
        self._targets: dict[Any, tuple[str, ...]] = {}

    def modules(self, value: Any) -> dict[str, ModuleShape]:
        if not isinstance(value, str | bytes):
            return {k: ModuleShape(*v) for k, v in value.items()}
        found = self._modules.get(value)
        if found is None:
            found = self._modules[value] = {k: ModuleShape(*v) for k, v in json.loads(value).items()}
        return dict(found)

    def targets(self, value: Any) -> tuple[str, ...]:
        if not isinstance(value, str | bytes):
            return tuple(value)
        found = self._targets.get(value)
        if found is None:
            found = self._targets[value] = tuple(json.loads(value))
        return found


def _names_by_expert(
    rows: Rows, link: str, named_id: str, named: str, ids: str, params: Mapping[str, Any]
) -> dict[int, list[str]]:
    """``expert id -> names`` of its tags or tasks (one statement over a link table)."""
    out: dict[int, list[str]] = defaultdict(list)
    for eid, name in rows(
        f"SELECT {link}.expert_id, {named}.name FROM {link} JOIN {named} ON {named}.id = {link}.{named_id} "
        f"WHERE {link}.expert_id IN ({ids}) ORDER BY {link}.expert_id, {named}.name",
        params,
    ):
        out[eid].append(name)
    return out


def _lineage(rows: Rows, ids: str, params: Mapping[str, Any]) -> dict[int, Derivation]:
    """``expert id -> how it was derived`` for the derived experts among ``ids`` (two statements)."""
    heads = rows(
        "SELECT derivations.id, derivations.child_id, derivations.method, derivations.method_version, "
        "derivations.params, derivations.inputs_key, derivations.created_at FROM derivations "
        f"WHERE derivations.child_id IN ({ids})",
        params,
    )
    if not heads:
        return {}
    parents: dict[int, list[DerivationParent]] = defaultdict(list)
    for did, role, name, sha in rows(
        "SELECT derivation_parents.derivation_id, derivation_parents.role, derivation_parents.parent_name, "
        "derivation_parents.parent_sha256 FROM derivation_parents JOIN derivations ON derivations.id = "
        f"derivation_parents.derivation_id WHERE derivations.child_id IN ({ids}) "
        "ORDER BY derivation_parents.derivation_id, derivation_parents.position",
        params,
    ):
        parents[did].append(DerivationParent(role, name, sha))
    return {
        child: derivation(method, version, params_, key, created, parents[did])
        for did, child, method, version, params_, key, created in heads
    }


def derivation(
    method: str, version: int, params: Any, inputs_key: str, created: Any, parents: Sequence[DerivationParent]
) -> Derivation:
    """A derivation record from its row's values (the one place they are read back)."""
    return Derivation(
        method=method,
        method_version=version,
        params=dict(json_value(params) or {}),
        inputs_key=inputs_key,
        parents=tuple(parents),
        created_at=timestamp(created),
    )


def of_session(session: Session) -> Reader:
    """A :class:`Reader` over a catalog transaction (the statements go to the driver as they are)."""
    from sqlalchemy import text

    def run(sql: str, params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        return session.execute(text(sql), dict(params)).all()

    return Reader(run, session.get_bind().dialect.name)
