"""Catalog reads and writes for base models, experts and blobs (tags and tasks: ``catalog/tags.py``).

Every function takes an open ``Session``: the operation calling it owns the transaction. Operations
hand in and get back the dataclasses of ``libstore.types`` (``Expert``, ``BaseModel``); the ``*_row``
helpers exist for the other catalog modules, which link rows to rows, and never leave ``catalog/``.

Listing costs a constant number of statements however many experts match (:func:`find_experts`:
one for the experts, one each for their files, tags, tasks and lineage), and writes that touch many
experts (tagging a query) are one set-based statement each, so a library of 100,000 experts lists
and tags as fast as the database can.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from libstore.catalog import reads
from libstore.catalog.batches import chunks, pairs
from libstore.catalog.filters import query_condition
from libstore.catalog.models import (
    BaseModelRow,
    BlobRow,
    ClusteringRow,
    ClusterRow,
    ExpertFileRow,
    ExpertRow,
    ExpertTagRow,
    ExpertTaskRow,
    PrototypeCacheRow,
    TagRow,
    TaskRow,
)
from libstore.catalog.tags import ensure_named
from libstore.errors import AlreadyExistsError, InUseError, NotFoundError, ValidationError
from libstore.types import (
    ADAPTER_WEIGHTS,
    BaseModel,
    Expert,
    ExpertQuery,
    LinearShape,
    StoredFile,
    parse_cluster_ref,
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
        known = (
            ", ".join(session.scalars(select(BaseModelRow.name).order_by(BaseModelRow.name))) or "none yet"
        )
        raise NotFoundError(
            f"no base model named {name!r} (registered: {known}); "
            f"register it with: libstore base add {name} --from PATH_OR_HUB_ID",
            what="base model",
            name=name,
        )
    return row


def get_base(session: Session, name: str) -> BaseModel:
    return to_base(base_row(session, name))


def add_base(session: Session, base: BaseModel) -> None:
    """Register ``base``; :class:`AlreadyExistsError` if a base of that name is registered."""
    if session.scalar(select(BaseModelRow.id).where(BaseModelRow.name == base.name)) is not None:
        raise AlreadyExistsError(
            f"a base model named {base.name!r} is already registered; see it with: libstore base show "
            f"{base.name}",
            what="base model",
            name=base.name,
        )
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


def resolve_base(session: Session, base: str | None) -> BaseModel:
    """The named base, or the only registered one when no name is given."""
    if base is not None:
        return get_base(session, base)
    rows = list(session.scalars(select(BaseModelRow).order_by(BaseModelRow.name).limit(11)))
    if len(rows) == 1:
        return to_base(rows[0])
    if not rows:
        raise NotFoundError(
            "no base model is registered; register one first: libstore base add NAME --from PATH",
            what="base model",
        )
    names = ", ".join(r.name for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
    raise ValidationError(
        f"several base models are registered ({names}); choose one with --base", field="base"
    )


def list_bases(session: Session) -> list[BaseModel]:
    return [to_base(r) for r in session.scalars(select(BaseModelRow).order_by(BaseModelRow.name))]


def remove_base(session: Session, name: str) -> None:
    """Unregister a base model; :class:`InUseError` while experts of it remain."""
    row = base_row(session, name)
    users = tuple(
        session.scalars(
            select(ExpertRow.name).where(ExpertRow.base_model_id == row.id).order_by(ExpertRow.name).limit(5)
        )
    )
    if users:
        more = ", ..." if len(users) == 5 else ""
        raise InUseError(
            f"base model {name!r} still has experts ({', '.join(users)}{more}); "
            f"remove them first (libstore ls base={name})",
            what="base model",
            name=name,
            used_by=users,
        )
    session.delete(row)
    session.flush()


def cluster_row(session: Session, clustering: str, index: int) -> ClusterRow:
    """Cluster ``index`` of the clustering named ``clustering``."""
    run = session.scalar(select(ClusteringRow).where(ClusteringRow.name == clustering))
    if run is None:
        raise NotFoundError(
            f"no clustering named {clustering!r}; see: libstore clusters ls",
            what="clustering",
            name=clustering,
        )
    row = session.scalar(
        select(ClusterRow).where(ClusterRow.clustering_id == run.id, ClusterRow.index == index)
    )
    if row is None:
        raise NotFoundError(
            f"clustering {clustering!r} has clusters 0..{len(run.clusters) - 1}, not {index}",
            what="cluster",
            name=f"{clustering}:{index}",
        )
    return row


def cluster_tasks(session: Session, clustering: str, index: int) -> tuple[str, ...]:
    """The tasks of cluster ``index`` of ``clustering`` (what a cluster expert is trained on)."""
    return tuple(t.name for t in cluster_row(session, clustering, index).tasks)


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


# --- querying experts --------------------------------------------------------------------------


def find_experts(session: Session, query: ExpertQuery, *, with_lineage: bool = True) -> list[Expert]:
    """The experts ``query`` matches, in name order, in a constant number of statements."""
    return reads.list_experts(reads.of_session(session), query, with_lineage=with_lineage)


def expert_names(session: Session, query: ExpertQuery) -> list[str]:
    """Names of the experts ``query`` matches, in name order (one statement)."""
    stmt = select(ExpertRow.name).where(query_condition(session, query)).order_by(ExpertRow.name)
    return list(session.scalars(stmt))


def get_expert(session: Session, name: str) -> Expert:
    found = reads.experts(reads.of_session(session), reads.Page(reads.name_is(name)))
    if not found:
        raise NotFoundError.expert(name)
    return found[0]


def expert_row(session: Session, name: str) -> ExpertRow:
    row = session.scalar(select(ExpertRow).where(ExpertRow.name == name))
    if row is None:
        raise NotFoundError.expert(name)
    return row


def expert_exists(session: Session, name: str) -> bool:
    return session.scalar(select(ExpertRow.id).where(ExpertRow.name == name)) is not None


def expert_sha256(session: Session, name: str) -> str | None:
    """The weights sha256 of expert ``name``, ``None`` if there is no such expert."""
    return session.scalar(select(ExpertRow.sha256).where(ExpertRow.name == name))


# --- writing experts ---------------------------------------------------------------------------


def add_expert(session: Session, expert: Expert) -> Expert:
    """Record ``expert`` (its blobs already in the store; ``blobs`` rows are ensured here) and return
    it as stored. ``expert.cluster`` (``CLUSTERING:INDEX``) links it to that cluster; how a derived
    expert was computed is recorded by ``catalog.derivations``, so ``lineage`` must be ``None``."""
    if expert.lineage is not None:
        raise ValueError("add_expert records no lineage: record it with catalog.derivations")
    cluster_id = _cluster_id(session, expert.cluster)
    row = _insert(session, expert, base_row(session, expert.base_model).id, cluster_id)
    return dataclasses.replace(expert, created_at=row.created_at)


def add_experts(session: Session, experts: Sequence[Expert]) -> None:
    """:func:`add_expert` for many experts at once (one base lookup per base; the bulk writer)."""
    if any(e.lineage is not None for e in experts):
        raise ValueError("add_experts records no lineage: record it with catalog.derivations")
    bases = {n: base_row(session, n).id for n in dict.fromkeys(e.base_model for e in experts)}
    insert_experts(session, [(e, bases[e.base_model], _cluster_id(session, e.cluster)) for e in experts])


def _cluster_id(session: Session, ref: str | None) -> int | None:
    """The id of cluster ``CLUSTERING:INDEX`` an expert added here links to (it must exist)."""
    if ref is None:
        return None
    name, index = parse_cluster_ref(ref)
    if index is None:
        raise ValidationError(
            f"--cluster takes CLUSTERING:INDEX (e.g. mbc-k10:3), got {ref!r}", field="cluster"
        )
    return cluster_row(session, name, index).id


def expert_columns(expert: Expert) -> dict[str, Any]:
    """The ``experts`` columns the record sets from its LoRA config and metadata (name, base, files,
    links and provenance aside): what inserting and replacing an expert's content both write."""
    return {
        "kind": expert.kind,
        "rank": expert.rank,
        "alpha": expert.alpha,
        "use_rslora": expert.use_rslora,
        "target_modules": list(expert.target_modules),
        "module_shapes": {k: [v.in_features, v.out_features, v.rank] for k, v in expert.modules.items()},
        "dtype": expert.dtype,
        "extra": dict(expert.metadata),
    }


def _insert(session: Session, expert: Expert, base_id: int, cluster_id: int | None) -> ExpertRow:
    """One expert through :func:`insert_experts`, as its ORM row (for callers that link to it)."""
    (expert_id,) = insert_experts(session, [(expert, base_id, cluster_id)])
    row = session.get(ExpertRow, expert_id)
    assert row is not None
    return row


def expert_sha256s(session: Session, names: Sequence[str]) -> dict[str, str]:
    """``name -> weights sha256`` of those of ``names`` that are experts (one statement per 5,000)."""
    out: dict[str, str] = {}
    for part in chunks(names):
        out.update(pairs(session, select(ExpertRow.name, ExpertRow.sha256).where(ExpertRow.name.in_(part))))
    return out


def insert_experts(session: Session, items: Sequence[tuple[Expert, int, int | None]]) -> list[int]:
    """The one writer of expert rows and their file, tag and task links: ``(expert, base id, cluster
    id)`` each, in bulk (a constant number of statements per 5,000 experts); returns their ids."""
    names = [e.name for e, _, _ in items]
    if len(set(names)) != len(names):
        raise ValueError("insert_experts: names must be unique")
    taken = sorted(expert_sha256s(session, names))
    if taken:
        raise AlreadyExistsError(
            f"an expert named {taken[0]!r} already exists; choose another --name, or remove it first",
            what="expert",
            name=taken[0],
        )
    for e, _, _ in items:
        if e.file(ADAPTER_WEIGHTS).sha256 != e.sha256:
            raise ValueError(f"expert {e.name!r}: sha256 must be the hash of {ADAPTER_WEIGHTS}")
    _ensure_blobs(session, {f.sha256: f.size for e, _, _ in items for f in e.files})
    now = dt.datetime.now(dt.UTC)
    ids: dict[str, int] = {}
    for part in chunks(items):
        session.execute(
            insert(ExpertRow),
            [
                {
                    "name": e.name,
                    "base_model_id": base_id,
                    **expert_columns(e),
                    "sha256": e.sha256,
                    "bytes": sum(f.size for f in e.files),
                    "source": e.source,
                    "cluster_id": cluster_id,
                    "created_at": e.created_at or now,
                    "updated_at": now,
                }
                for e, base_id, cluster_id in part
            ],
        )
        part_names = [e.name for e, _, _ in part]
        stmt = select(ExpertRow.name, ExpertRow.id).where(ExpertRow.name.in_(part_names))
        ids.update(pairs(session, stmt))
    files = [
        {"expert_id": ids[e.name], "path": f.path, "blob_sha256": f.sha256, "size": f.size}
        for e, _, _ in items
        for f in e.files
    ]
    if files:
        session.execute(insert(ExpertFileRow), files)
    for link, named, key, field in (
        (ExpertTaskRow, TaskRow, "task_id", "tasks"),
        (ExpertTagRow, TagRow, "tag_id", "tags"),
    ):
        wanted = {e.name: list(dict.fromkeys(getattr(e, field))) for e, _, _ in items}
        named_ids = ensure_named(session, named, list(dict.fromkeys(n for v in wanted.values() for n in v)))
        links = [{"expert_id": ids[name], key: named_ids[n]} for name, ns in wanted.items() for n in ns]
        if links:
            session.execute(insert(link), links)
    return [ids[n] for n in names]


def _ensure_blobs(session: Session, sizes: dict[str, int]) -> None:
    """Record the blobs ``sha256 -> size`` the store holds (idempotent, bulk)."""
    digests = list(sizes)
    have: set[str] = set()
    for part in chunks(digests):
        have.update(session.scalars(select(BlobRow.sha256).where(BlobRow.sha256.in_(part))))
    missing = [{"sha256": d, "size": sizes[d]} for d in digests if d not in have]
    if missing:
        session.execute(insert(BlobRow), missing)


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


def delete_expert(session: Session, name: str) -> None:
    """Delete expert ``name``; tag, task and file links go with it, the blobs stay until ``gc``."""
    session.delete(expert_row(session, name))
    session.flush()


def rename_expert(session: Session, old: str, new: str) -> Expert:
    expert_row(session, old)
    if expert_exists(session, new):
        raise AlreadyExistsError(
            f"an expert named {new!r} already exists; choose another name", what="expert", name=new
        )
    session.execute(update(ExpertRow).where(ExpertRow.name == old).values(name=new))
    session.expire_all()
    return get_expert(session, new)
