"""Catalog reads and writes of ``verify``, ``verify --repair`` and ``gc``.

What maintenance needs to know of the catalog (experts with their files, prototype caches, ``blobs``
rows, which blobs rows reference, rows whose foreign keys point at nothing) comes back as
dataclasses; the repairs and deletions are functions here too. Every function takes an open
``Session``; the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, delete, select, union, update
from sqlalchemy.orm import Session

from libstore.catalog import prototypes as cache
from libstore.catalog import repo
from libstore.catalog.batches import chunks
from libstore.catalog.models import Base, BlobRow, ExpertFileRow, ExpertRow, PrototypeCacheRow
from libstore.types import BaseModel, Expert, ExpertQuery, PrototypeSet

#: Digests per ``IN (...)`` list: within every driver's parameter limit.
IN_CHUNK = 500


@dataclass(frozen=True)
class DanglingRow:
    """A row whose foreign key points at a row that does not exist.

    Attributes:
        table, column, value: the row's table, the foreign-key column and its value.
        target: the ``table.column`` it should point at.
        key: the row's primary key as (column, value) pairs.
        on_delete: the schema's ``ON DELETE`` rule for that key (``CASCADE``, ``SET NULL``, ...).
    """

    table: str
    column: str
    value: Any
    target: str
    key: tuple[tuple[str, Any], ...]
    on_delete: str | None


@dataclass(frozen=True)
class CatalogSnapshot:
    """What ``verify`` reads, in one read transaction (one snapshot on PostgreSQL too).

    Attributes:
        experts: every expert whose base model row exists, by name (the others are dangling rows).
        bases: base model name -> its record.
        caches: every prototype cache entry, with the experts that have its weights.
        blob_sizes: ``blobs`` rows: digest -> recorded size.
        dangling: rows pointing at nothing (blob references excepted: verify checks those itself).
    """

    experts: tuple[Expert, ...]
    bases: dict[str, BaseModel]
    caches: tuple[PrototypeSet, ...]
    blob_sizes: dict[str, int]
    dangling: tuple[DanglingRow, ...]


def snapshot(session: Session) -> CatalogSnapshot:
    """Read everything ``verify`` checks (in one read transaction: one snapshot)."""
    experts = tuple(repo.find_experts(session, ExpertQuery(), with_lineage=False))
    bases = {b.name: b for b in repo.list_bases(session)}
    return CatalogSnapshot(
        experts=experts,
        bases=bases,
        caches=tuple(cache.entries(session)),
        blob_sizes=blob_sizes(session),
        dangling=tuple(dangling_rows(session)),
    )


def blob_sizes(session: Session) -> dict[str, int]:
    """Every ``blobs`` row: digest -> recorded size."""
    return {sha: int(size) for sha, size in session.execute(select(BlobRow.sha256, BlobRow.size))}


def referenced_among(session: Session, sha256s: Iterable[str]) -> set[str]:
    """Those of ``sha256s`` that an expert file or a prototype cache row references."""
    shas = sorted(set(sha256s))
    found: set[str] = set()
    for part in chunks(shas, IN_CHUNK):
        stmt = union(
            select(ExpertFileRow.blob_sha256).where(ExpertFileRow.blob_sha256.in_(part)),
            select(PrototypeCacheRow.blob_sha256).where(PrototypeCacheRow.blob_sha256.in_(part)),
        )
        found.update(session.scalars(stmt))
    return found


def live_references(session: Session) -> set[str]:
    """Blobs referenced by expert files and by prototype caches of weights some expert still has
    (what stays referenced once gc has dropped the orphaned caches)."""
    files = set(session.scalars(select(ExpertFileRow.blob_sha256)))
    live = select(ExpertRow.sha256)
    protos = session.scalars(
        select(PrototypeCacheRow.blob_sha256).where(PrototypeCacheRow.expert_sha256.in_(live))
    )
    return files | set(protos)


def dangling_rows(session: Session) -> list[DanglingRow]:
    """Every single-column foreign key value that points at no row, found from the schema."""
    found: list[DanglingRow] = []
    for table in Base.metadata.sorted_tables:
        for fk in table.foreign_keys:
            col, target = fk.parent, fk.column
            if target.table.name == BlobRow.__tablename__:
                continue  # blob references are checked (and repaired) as unrecorded blobs
            pk = list(table.primary_key.columns)
            stmt = (
                select(*pk, col).where(col.is_not(None)).where(~select(target).where(target == col).exists())
            )
            for r in session.execute(stmt):
                *keys, value = r
                found.append(
                    DanglingRow(
                        table=table.name,
                        column=col.name,
                        value=value,
                        target=f"{target.table.name}.{target.name}",
                        key=tuple((c.name, k) for c, k in zip(pk, keys, strict=True)),
                        on_delete=fk.ondelete.upper() if fk.ondelete else None,
                    )
                )
    return found


# --- repairs and deletions ---------------------------------------------------------------------


def record_blob(session: Session, sha256: str, size: int) -> None:
    """Record a blob the store holds (idempotent)."""
    repo.ensure_blob(session, sha256, size)


def set_blob_size(session: Session, sha256: str, size: int) -> None:
    session.execute(update(BlobRow).where(BlobRow.sha256 == sha256).values(size=size))


def delete_blob_rows(session: Session, sha256s: Iterable[str]) -> None:
    """Delete ``blobs`` rows (the caller has checked that nothing references them)."""
    shas = sorted(set(sha256s))
    for part in chunks(shas, IN_CHUNK):
        session.execute(delete(BlobRow).where(BlobRow.sha256.in_(part)))


def drop_caches_of_blob(session: Session, sha256: str) -> int:
    """Delete the prototype cache rows stored in blob ``sha256``; returns how many."""
    result = session.execute(delete(PrototypeCacheRow).where(PrototypeCacheRow.blob_sha256 == sha256))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]  # DML results have rowcount


def drop_cache(session: Session, *, expert_sha256: str, method: str, blob_sha256: str) -> None:
    """Delete one prototype cache entry (it is recomputed on demand)."""
    session.execute(
        delete(PrototypeCacheRow).where(
            PrototypeCacheRow.expert_sha256 == expert_sha256,
            PrototypeCacheRow.method == method,
            PrototypeCacheRow.blob_sha256 == blob_sha256,
        )
    )


def resolve_dangling(session: Session, row: DanglingRow) -> str | None:
    """Do to a dangling row what deleting its target would have done (``SET NULL`` or ``CASCADE``);
    returns what was done, or None where the schema says to refuse (``RESTRICT``)."""
    table: Table = Base.metadata.tables[row.table]
    col = table.c[row.column]
    cond = [table.c[k] == v for k, v in row.key]
    if row.on_delete == "SET NULL":
        session.execute(update(table).where(*cond, col == row.value).values({col: None}))
        return f"set {row.column} to NULL (as deleting the {row.target} row would have)"
    if row.on_delete == "CASCADE":
        session.execute(delete(table).where(*cond))
        return f"deleted the row (as deleting the {row.target} row would have)"
    return None
