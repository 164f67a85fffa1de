"""Catalog queries and writes for base models, experts, blobs, tags and tasks.

Every function takes an open ``Session`` (the caller owns the transaction) and returns
``libstore.types`` dataclasses or ORM rows that stay inside the catalog and ops layers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session

from libstore.catalog.models import (
    BaseModelRow,
    BlobRow,
    ClusteringRow,
    ClusterRow,
    DerivationParentRow,
    DerivationRow,
    ExpertFileRow,
    ExpertRow,
    ExpertTagRow,
    PrototypeCacheRow,
    TagRow,
    TaskRow,
)
from libstore.errors import (
    AlreadyExistsError,
    NotFoundError,
    QueryError,
    ValidationError,
)
from libstore.types import (
    BaseModel,
    Derivation,
    DerivationParent,
    Expert,
    ExpertQuery,
    LinearShape,
    ModuleShape,
    StoredFile,
)

# --- base models -------------------------------------------------------------------------------


def to_base(row: BaseModelRow) -> BaseModel:
    return BaseModel(
        name=row.name,
        source=row.source,
        revision=row.revision,
        architecture=row.architecture,
        model_type=row.model_type,
        fingerprint=row.fingerprint,
        linear_shapes={k: LinearShape(*v) for k, v in row.linear_shapes.items()},
        created_at=row.created_at,
        origin=row.origin,
    )


def base_row(session: Session, name: str) -> BaseModelRow:
    row = session.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
    if row is None:
        known = ", ".join(session.scalars(select(BaseModelRow.name))) or "none yet"
        raise NotFoundError(
            f"no base model named {name!r} (registered: {known}); "
            f"register it with: libstore base add {name} --from PATH_OR_HUB_ID"
        )
    return row


def add_base(session: Session, base: BaseModel) -> BaseModelRow:
    if session.scalar(select(BaseModelRow.id).where(BaseModelRow.name == base.name)) is not None:
        raise AlreadyExistsError(f"a base model named {base.name!r} is already registered")
    row = BaseModelRow(
        name=base.name,
        source=base.source,
        revision=base.revision,
        architecture=base.architecture,
        model_type=base.model_type,
        fingerprint=base.fingerprint,
        linear_shapes={k: [v.in_features, v.out_features] for k, v in base.linear_shapes.items()},
        origin=base.origin,
    )
    session.add(row)
    session.flush()
    return row


def resolve_base_row(session: Session, base: str | None) -> BaseModelRow:
    """The named base, or the only registered one when no name is given."""
    if base is not None:
        return base_row(session, base)
    rows = list(session.scalars(select(BaseModelRow)))
    if len(rows) == 1:
        return rows[0]
    if not rows:
        raise NotFoundError(
            "no base model is registered; register one first: libstore base add NAME --from PATH"
        )
    names = ", ".join(sorted(r.name for r in rows))
    raise ValidationError(f"several base models are registered ({names}); choose one with --base")


def cluster_row(session: Session, clustering: str, index: int) -> ClusterRow:
    """Cluster ``index`` of the clustering named ``clustering``."""
    run = session.scalar(select(ClusteringRow).where(ClusteringRow.name == clustering))
    if run is None:
        raise NotFoundError(f"no clustering named {clustering!r}; see: libstore clusters ls")
    row = session.scalar(
        select(ClusterRow).where(ClusterRow.clustering_id == run.id, ClusterRow.index == index)
    )
    if row is None:
        raise NotFoundError(f"clustering {clustering!r} has clusters 0..{len(run.clusters) - 1}, not {index}")
    return row


def list_bases(session: Session) -> list[BaseModel]:
    return [to_base(r) for r in session.scalars(select(BaseModelRow).order_by(BaseModelRow.name))]


def remove_base(session: Session, name: str) -> None:
    row = base_row(session, name)
    used = session.scalar(select(ExpertRow.id).where(ExpertRow.base_model_id == row.id).limit(1))
    if used is not None:
        raise AlreadyExistsError(
            f"base model {name!r} still has experts; remove them first (libstore ls --base {name})"
        )
    session.delete(row)


# --- blobs -------------------------------------------------------------------------------------


def ensure_blob(session: Session, sha256: str, size: int) -> None:
    """Record a blob the store holds (idempotent)."""
    if session.get(BlobRow, sha256) is None:
        session.add(BlobRow(sha256=sha256, size=size))
        session.flush()


def referenced_blobs(session: Session) -> set[str]:
    """Digests some row still points at: expert files and prototype caches."""
    files = session.scalars(select(ExpertFileRow.blob_sha256))
    protos = session.scalars(select(PrototypeCacheRow.blob_sha256))
    return set(files) | set(protos)


def unreferenced_blob_rows(session: Session) -> list[BlobRow]:
    used = referenced_blobs(session)
    return [b for b in session.scalars(select(BlobRow)) if b.sha256 not in used]


# --- tags and tasks ----------------------------------------------------------------------------


def tag_row(session: Session, name: str) -> TagRow:
    row = session.scalar(select(TagRow).where(TagRow.name == name))
    if row is None:
        row = TagRow(name=name)
        session.add(row)
        session.flush()
    return row


def task_row(session: Session, name: str) -> TaskRow:
    row = session.scalar(select(TaskRow).where(TaskRow.name == name))
    if row is None:
        row = TaskRow(name=name)
        session.add(row)
        session.flush()
    return row


def list_tags(session: Session) -> list[tuple[str, int]]:
    """Every tag with the number of experts carrying it."""
    stmt = (
        select(TagRow.name, func.count(ExpertTagRow.expert_id))
        .outerjoin(ExpertTagRow, ExpertTagRow.tag_id == TagRow.id)
        .group_by(TagRow.name)
        .order_by(TagRow.name)
    )
    return [(name, int(n)) for name, n in session.execute(stmt)]


# --- experts -----------------------------------------------------------------------------------


def expert_row(session: Session, name: str) -> ExpertRow:
    row = session.scalar(select(ExpertRow).where(ExpertRow.name == name))
    if row is None:
        raise NotFoundError(f"no expert named {name!r}; list them with: libstore ls")
    return row


def expert_exists(session: Session, name: str) -> bool:
    return session.scalar(select(ExpertRow.id).where(ExpertRow.name == name)) is not None


def _glob_to_like(pattern: str) -> str:
    out = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return out.replace("*", "%").replace("?", "_")


def _query_statement(query: ExpertQuery) -> Select[tuple[ExpertRow]]:
    stmt = select(ExpertRow)
    if query.names:
        conds = []
        for n in query.names:
            if "*" in n or "?" in n:
                conds.append(ExpertRow.name.like(_glob_to_like(n), escape="\\"))
            else:
                conds.append(ExpertRow.name == n)
        stmt = stmt.where(or_(*conds))
    if query.kinds:
        stmt = stmt.where(ExpertRow.kind.in_(query.kinds))
    if query.bases:
        stmt = stmt.where(ExpertRow.base_model.has(BaseModelRow.name.in_(query.bases)))
    if query.tags:
        stmt = stmt.where(ExpertRow.tags.any(TagRow.name.in_(query.tags)))
    if query.tasks:
        stmt = stmt.where(ExpertRow.tasks.any(TaskRow.name.in_(query.tasks)))
    if query.clusters:
        conds = []
        for c in query.clusters:
            clustering, _, index = c.partition(":")
            ids = select(ClusteringRow.id).where(ClusteringRow.name == clustering)
            cond = ClusterRow.clustering_id.in_(ids)
            if index:
                if not index.isdigit():
                    raise QueryError(f"cluster must be NAME or NAME:INDEX, got {c!r}")
                cond = cond & (ClusterRow.index == int(index))
            conds.append(cond)
        stmt = stmt.where(ExpertRow.cluster.has(or_(*conds)))
    return stmt.order_by(ExpertRow.name)


def find_expert_rows(session: Session, query: ExpertQuery) -> list[ExpertRow]:
    return list(session.scalars(_query_statement(query)).unique())


def lineage_of(session: Session, expert_id: int) -> Derivation | None:
    d = session.scalar(select(DerivationRow).where(DerivationRow.child_id == expert_id))
    if d is None:
        return None
    return Derivation(
        method=d.method,
        method_version=d.method_version,
        params=dict(d.params),
        inputs_key=d.inputs_key,
        parents=tuple(DerivationParent(p.role, p.parent_name, p.parent_sha256) for p in d.parents),
        created_at=d.created_at,
    )


def to_expert(session: Session, row: ExpertRow, *, with_lineage: bool = True) -> Expert:
    cluster = None
    if row.cluster is not None:
        clustering = session.get(ClusteringRow, row.cluster.clustering_id)
        cluster = f"{clustering.name}:{row.cluster.index}" if clustering else None
    return Expert(
        name=row.name,
        kind=row.kind,
        base_model=row.base_model.name,
        rank=row.rank,
        alpha=row.alpha,
        use_rslora=row.use_rslora,
        target_modules=tuple(row.target_modules),
        modules={k: ModuleShape(*v) for k, v in row.module_shapes.items()},
        dtype=row.dtype,
        sha256=row.sha256,
        bytes=row.bytes,
        files=tuple(StoredFile(f.path, f.blob_sha256, f.size) for f in row.files),
        source=row.source,
        tasks=tuple(t.name for t in row.tasks),
        tags=tuple(t.name for t in row.tags),
        cluster=cluster,
        metadata=dict(row.extra or {}),
        lineage=lineage_of(session, row.id) if with_lineage else None,
        created_at=row.created_at,
    )


def insert_expert(
    session: Session,
    *,
    name: str,
    kind: str,
    base: BaseModelRow,
    rank: int,
    alpha: float,
    use_rslora: bool,
    target_modules: Sequence[str],
    modules: dict[str, ModuleShape],
    dtype: str,
    files: Sequence[StoredFile],
    weights_file: str,
    source: str | None,
    metadata: dict[str, Any] | None = None,
    tasks: Iterable[str] = (),
    tags: Iterable[str] = (),
    cluster_id: int | None = None,
) -> ExpertRow:
    """Insert an expert whose blobs are already in the store; blobs rows are ensured here."""
    if expert_exists(session, name):
        raise AlreadyExistsError(
            f"an expert named {name!r} already exists; choose another --name, or remove it first"
        )
    weights = next(f for f in files if f.path == weights_file)
    for f in files:
        ensure_blob(session, f.sha256, f.size)
    row = ExpertRow(
        name=name,
        kind=kind,
        base_model=base,
        rank=rank,
        alpha=alpha,
        use_rslora=use_rslora,
        target_modules=list(target_modules),
        module_shapes={k: [v.in_features, v.out_features, v.rank] for k, v in modules.items()},
        dtype=dtype,
        sha256=weights.sha256,
        bytes=sum(f.size for f in files),
        source=source,
        extra=dict(metadata or {}),
        cluster_id=cluster_id,
    )
    row.files = [ExpertFileRow(path=f.path, blob_sha256=f.sha256, size=f.size) for f in files]
    row.tasks = [task_row(session, t) for t in dict.fromkeys(tasks)]
    row.tags = [tag_row(session, t) for t in dict.fromkeys(tags)]
    session.add(row)
    session.flush()
    return row


def replace_files(
    session: Session, row: ExpertRow, files: Sequence[StoredFile], weights_file: str, **fields: Any
) -> None:
    """Point an existing expert at new content (used by derivations refreshed in place and pull)."""
    for f in files:
        ensure_blob(session, f.sha256, f.size)
    row.files = [ExpertFileRow(path=f.path, blob_sha256=f.sha256, size=f.size) for f in files]
    row.sha256 = next(f.sha256 for f in files if f.path == weights_file)
    row.bytes = sum(f.size for f in files)
    for key, value in fields.items():
        setattr(row, key, value)
    session.flush()


def delete_expert(session: Session, row: ExpertRow) -> None:
    """Delete the row; tag, task and file links go with it, the blobs stay until ``gc``."""
    session.delete(row)
    session.flush()


def derived_children(session: Session, row: ExpertRow) -> list[str]:
    """Names of experts derived from ``row``."""
    stmt = (
        select(ExpertRow.name)
        .join(DerivationRow, DerivationRow.child_id == ExpertRow.id)
        .join(DerivationParentRow, DerivationParentRow.derivation_id == DerivationRow.id)
        .where(DerivationParentRow.parent_id == row.id)
    )
    return sorted(set(session.scalars(stmt)))
