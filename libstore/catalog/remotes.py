"""Catalog side of Hub sync: remotes, per-expert sync state, and the records a manifest carries.

``remotes`` holds where a library syncs to (repo id, tracked branch, visibility) and ``last_commit``,
the remote commit the library last pushed or pulled. ``remote_experts`` holds, per remote and
expert name, the *record digest* both sides had at that sync (``synced_digest``: the sha256 of the
expert's manifest entry — weights and config hashes, kind, tasks, tags, metadata, derivation and
cluster), which is what three-way sync planning compares. Tokens are never stored here.

Derivations and clusterings are read and written by ``catalog.derivations`` and
``catalog.clusterings`` (their one writers); this module registers the base models a manifest
carries and :func:`link_experts` links the records kept by name to experts a pull has just added.
Every function takes an open ``Session``; the caller owns the transaction.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable, Mapping

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from libstore.catalog import clusterings, repo, tags
from libstore.catalog.batches import chunks
from libstore.catalog.models import (
    BaseModelRow,
    ClusteringInputRow,
    ClusterMemberRow,
    DerivationParentRow,
    ExpertRow,
    RemoteExpertRow,
    RemoteRow,
)
from libstore.errors import AlreadyExistsError, BaseModelMismatchError, NotFoundError
from libstore.types import ADAPTER_WEIGHTS, BaseModel, Expert, Remote


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- remotes ---------------------------------------------------------------------------------------


def _to_remote(session: Session, row: RemoteRow) -> Remote:
    n = session.scalar(
        select(func.count()).select_from(RemoteExpertRow).where(RemoteExpertRow.remote_id == row.id)
    )
    return Remote(
        name=row.name,
        repo_id=row.repo_id,
        revision=row.revision,
        private=row.private,
        last_commit=row.last_commit,
        last_synced_at=row.last_synced_at,
        created_at=row.created_at,
        synced=int(n or 0),
    )


def _remote_row(session: Session, name: str) -> RemoteRow:
    row = session.scalar(select(RemoteRow).where(RemoteRow.name == name))
    if row is None:
        known = ", ".join(session.scalars(select(RemoteRow.name).order_by(RemoteRow.name))) or "none yet"
        raise NotFoundError(
            f"no remote named {name!r} (remotes: {known}); add one with: libstore remote add {name} ORG/REPO",
            what="remote",
            name=name,
        )
    return row


def resolve_remote(session: Session, name: str | None) -> Remote:
    """The named remote, or when none is named ``origin``, else the only one."""
    if name is not None:
        return _to_remote(session, _remote_row(session, name))
    names = list(session.scalars(select(RemoteRow.name).order_by(RemoteRow.name)))
    found = "origin" if "origin" in names else names[0] if len(names) == 1 else None
    if found is None:
        raise NotFoundError(
            "no remote given and none is the default (origin, or the only one); add one with: "
            "libstore remote add origin ORG/REPO",
            what="remote",
        )
    return _to_remote(session, _remote_row(session, found))


def add_remote(session: Session, *, name: str, repo_id: str, revision: str, private: bool) -> Remote:
    if session.scalar(select(RemoteRow.id).where(RemoteRow.name == name)) is not None:
        raise AlreadyExistsError(
            f"a remote named {name!r} already exists; remove it first (libstore remote rm {name})",
            what="remote",
            name=name,
        )
    row = RemoteRow(name=name, repo_id=repo_id, revision=revision, private=private)
    session.add(row)
    session.flush()
    return _to_remote(session, row)


def list_remotes(session: Session) -> list[Remote]:
    return [_to_remote(session, r) for r in session.scalars(select(RemoteRow).order_by(RemoteRow.name))]


def remove_remote(session: Session, name: str) -> None:
    session.delete(_remote_row(session, name))
    session.flush()


def sync_state(session: Session, remote: str) -> dict[str, str]:
    """``expert name -> record digest`` both sides had at the last sync with remote ``remote``."""
    row = _remote_row(session, remote)
    stmt = select(RemoteExpertRow.expert_name, RemoteExpertRow.synced_digest).where(
        RemoteExpertRow.remote_id == row.id
    )
    return {n: d for n, d in session.execute(stmt)}


def record_sync(
    session: Session,
    remote: str,
    *,
    commit: str,
    digests: Mapping[str, str],
    forget: Iterable[str] = (),
    last_commit: bool = True,
) -> None:
    """Record a finished push or pull with remote ``remote``: new digests per expert, forgotten
    names, the commit."""
    row = _remote_row(session, remote)
    forget = sorted(set(forget))
    if forget:
        for part in chunks(forget, 500):
            session.execute(
                delete(RemoteExpertRow).where(
                    RemoteExpertRow.remote_id == row.id, RemoteExpertRow.expert_name.in_(part)
                )
            )
    existing = {
        r.expert_name: r
        for r in session.scalars(select(RemoteExpertRow).where(RemoteExpertRow.remote_id == row.id))
    }
    now = _now()
    for name, digest in digests.items():
        rec = existing.get(name)
        if rec is None:
            session.add(
                RemoteExpertRow(
                    remote_id=row.id,
                    expert_name=name,
                    synced_digest=digest,
                    remote_commit=commit,
                    synced_at=now,
                )
            )
        elif rec.synced_digest != digest or rec.remote_commit != commit:
            rec.synced_digest, rec.remote_commit, rec.synced_at = digest, commit, now
    if last_commit:
        row.last_commit = commit
    row.last_synced_at = now
    session.flush()


# --- what a manifest carries -------------------------------------------------------------------------


def ensure_base(session: Session, base: BaseModel) -> None:
    """Make sure the local base model named like ``base`` is that model: registered from the record
    if absent (with the record's ``origin``: where a pull took it from).

    A local base of that name with another config fingerprint is a different model: refused.
    """
    row = session.scalar(select(BaseModelRow).where(BaseModelRow.name == base.name))
    if row is None:
        repo.add_base(session, base)
    elif row.fingerprint != base.fingerprint:
        raise BaseModelMismatchError(
            f"the remote's base model {base.name!r} ({base.architecture}, fingerprint "
            f"{base.fingerprint[:12]}) is not this library's {base.name!r} ({row.architecture}, "
            f"fingerprint {row.fingerprint[:12]}); its experts cannot be pulled into this library"
        )


def same_base(session: Session, base: BaseModel) -> bool:
    """Whether the local base model of that name is the same model (same fingerprint)."""
    row = session.scalar(select(BaseModelRow).where(BaseModelRow.name == base.name))
    return row is not None and row.fingerprint == base.fingerprint


def put_pulled_expert(session: Session, expert: Expert, *, source: str) -> bool:
    """Record a pulled, verified ``expert`` (its base registered, its blobs in the store) under its
    name, replacing the content of a local expert of that name; ``True`` when one was replaced.

    Its base and cluster are looked up by name (a cluster this library lacks is not linked); its
    lineage is recorded by ``catalog.derivations``. A new expert is stamped now, as any import is.
    """
    files = sorted(expert.files, key=lambda f: f.path)
    weights = next(f for f in files if f.path == ADAPTER_WEIGHTS)
    base = repo.base_row(session, expert.base_model)
    cid = clusterings.cluster_id(session, expert.cluster)
    existed = repo.expert_exists(session, expert.name)
    if existed:
        row = repo.expert_row(session, expert.name)
        repo.replace_files(
            session,
            row,
            files,
            ADAPTER_WEIGHTS,
            **repo.expert_columns(expert),
            base_model=base,
            cluster_id=cid,
            source=source,
        )
        row.tasks = [tags.task_row(session, t) for t in expert.tasks]
        row.tags = [tags.tag_row(session, t) for t in expert.tags]
    else:
        record = dataclasses.replace(
            expert,
            sha256=weights.sha256,
            bytes=sum(f.size for f in files),
            files=tuple(files),
            source=source,
            lineage=None,
            created_at=None,
        )
        repo.insert_experts(session, [(record, base.id, cid)])
    session.flush()
    return existed


# --- links of records kept by name ------------------------------------------------------------


def link_experts(session: Session, names: Iterable[str]) -> None:
    """Point clustering inputs/members and derivation parents recorded by name at these experts."""
    names = sorted(set(names))
    for chunk in chunks(names, 500):
        ids = {
            n: x
            for n, x in session.execute(select(ExpertRow.name, ExpertRow.id).where(ExpertRow.name.in_(chunk)))
        }
        for inp in session.scalars(
            select(ClusteringInputRow).where(
                ClusteringInputRow.expert_name.in_(chunk), ClusteringInputRow.expert_id.is_(None)
            )
        ):
            inp.expert_id = ids.get(inp.expert_name)
        for member in session.scalars(
            select(ClusterMemberRow).where(
                ClusterMemberRow.expert_name.in_(chunk), ClusterMemberRow.expert_id.is_(None)
            )
        ):
            member.expert_id = ids.get(member.expert_name)
        for p in session.scalars(
            select(DerivationParentRow).where(
                DerivationParentRow.parent_name.in_(chunk), DerivationParentRow.parent_id.is_(None)
            )
        ):
            p.parent_id = ids.get(p.parent_name)
    session.flush()
