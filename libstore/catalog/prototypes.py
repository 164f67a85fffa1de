"""Catalog queries and writes for the prototype cache.

One row per (expert sha256, method, method version, params_key) points at a safetensors blob holding
the prototypes of every LoRA module of the experts with those weights. Keys use the *content* hash,
so renaming an expert keeps its cache and changing its weights misses it; the cached values are
those of B·A, scale-free, so experts with one weights file and another ``lora_alpha`` share an entry
and each scales the values by its own s on read (``libstore.ops.prototypes``). ``params_key`` is
the sha256 of the canonical JSON of the method's parameters (see :func:`params_key`).

Every function takes an open ``Session``; the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.exc import IntegrityError as SAIntegrityError
from sqlalchemy.orm import Session

from libstore.canonical import canonical_sha256
from libstore.catalog.batches import chunks
from libstore.catalog.models import BlobRow, ExpertRow, PrototypeCacheRow
from libstore.catalog.repo import ensure_blob
from libstore.types import PrototypeSet


def params_key(params: dict[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace) of ``params``."""
    return canonical_sha256(params)


def _entry(row: PrototypeCacheRow, size: int, experts: Iterable[str] = ()) -> PrototypeSet:
    return PrototypeSet(
        expert_sha256=row.expert_sha256,
        method=row.method,
        method_version=row.method_version,
        params=dict(row.params or {}),
        params_key=row.params_key,
        blob_sha256=row.blob_sha256,
        size=size,
        created_at=row.created_at,
        experts=tuple(sorted(experts)),
    )


def _with_size() -> Select[PrototypeCacheRow, int]:
    """The cache rows with their blob's size (the foreign key guarantees a blob row)."""
    return select(PrototypeCacheRow, BlobRow.size).join(
        BlobRow, BlobRow.sha256 == PrototypeCacheRow.blob_sha256
    )


def find_cached(
    session: Session,
    expert_sha256s: Iterable[str],
    *,
    method: str,
    method_version: int,
    key: str,
) -> dict[str, str]:
    """``expert sha256 -> blob sha256`` for the hashes that have this cache entry."""
    shas = sorted(set(expert_sha256s))
    found: dict[str, str] = {}
    for part in chunks(shas, 500):  # keep IN lists within every driver's limits
        stmt = select(PrototypeCacheRow.expert_sha256, PrototypeCacheRow.blob_sha256).where(
            PrototypeCacheRow.expert_sha256.in_(part),
            PrototypeCacheRow.method == method,
            PrototypeCacheRow.method_version == int(method_version),
            PrototypeCacheRow.params_key == key,
        )
        found.update({sha: blob for sha, blob in session.execute(stmt)})
    return found


def record(
    session: Session,
    *,
    expert_sha256: str,
    method: str,
    method_version: int,
    params: dict[str, Any],
    blob_sha256: str,
    blob_size: int,
) -> bool:
    """Record a computed cache entry; ``False`` if another writer recorded it first (kept as is)."""
    key = params_key(params)
    if find_cached(session, [expert_sha256], method=method, method_version=method_version, key=key):
        return False
    try:
        with session.begin_nested():  # a concurrent writer may win the unique constraints
            ensure_blob(session, blob_sha256, blob_size)
            session.add(
                PrototypeCacheRow(
                    expert_sha256=expert_sha256,
                    method=method,
                    method_version=int(method_version),
                    params_key=key,
                    params=dict(params),
                    blob_sha256=blob_sha256,
                )
            )
    except SAIntegrityError:  # theirs is as good: same inputs, same method
        return False
    return True


def entries(session: Session, expert_sha256: str | None = None) -> list[PrototypeSet]:
    """Cache entries (of one expert hash, or all), each with the experts that have that hash now."""
    stmt = _with_size().order_by(
        PrototypeCacheRow.expert_sha256, PrototypeCacheRow.method, PrototypeCacheRow.created_at
    )
    if expert_sha256 is not None:
        stmt = stmt.where(PrototypeCacheRow.expert_sha256 == expert_sha256)
    rows = list(session.execute(stmt).tuples())
    names: dict[str, list[str]] = {}
    shas = sorted({r.expert_sha256 for r, _ in rows})
    for part in chunks(shas, 500):
        q = select(ExpertRow.sha256, ExpertRow.name).where(ExpertRow.sha256.in_(part))
        for sha, name in session.execute(q):
            names.setdefault(sha, []).append(name)
    return [_entry(r, size, names.get(r.expert_sha256, ())) for r, size in rows]


def orphaned(session: Session) -> list[PrototypeSet]:
    """Cache entries whose expert content no longer exists in the catalog."""
    live = select(ExpertRow.sha256)
    stmt = (
        _with_size()
        .where(PrototypeCacheRow.expert_sha256.not_in(live))
        .order_by(PrototypeCacheRow.expert_sha256, PrototypeCacheRow.method)
    )
    return [_entry(r, size) for r, size in session.execute(stmt).tuples()]


def delete_orphaned(session: Session) -> list[PrototypeSet]:
    """Delete the orphaned entries (their blobs go at the next ``gc``); returns what was deleted."""
    gone = orphaned(session)
    live = select(ExpertRow.sha256)
    for row in session.scalars(select(PrototypeCacheRow).where(PrototypeCacheRow.expert_sha256.not_in(live))):
        session.delete(row)
    session.flush()
    return gone
