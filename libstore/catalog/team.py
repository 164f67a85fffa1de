"""Library-wide settings and object-store blob claims: what every machine on one catalog shares.

``settings`` holds the object store URL (``blob_store``) so a library opened on this catalog anywhere
uses it without being told; never a credential. ``blob_claims`` is the object store's claim ledger
(the local folder store keeps claims in file times): gc on any machine keeps an unreferenced blob
claimed within its grace period.

Claims are written in their own short transaction that takes no write lock (an upsert of one row per
blob): a writer claims before it uploads, possibly while it holds the write lock in another session.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from libstore.catalog.batches import chunks
from libstore.catalog.engine import translate_errors
from libstore.catalog.models import BlobClaimRow, BlobRow, SettingRow

#: The settings key of the blob store URL (absent: each library folder holds its own blobs).
BLOB_STORE = "blob_store"
#: The settings key of the library (its ``library.json`` id) whose folder holds the blobs of a catalog
#: without a blob store; another folder library opened on that catalog holds only what it imported.
FOLDER_OWNER = "folder_blobs_library"


def has_blobs(session: Session) -> bool:
    """True if the catalog records any blob (a library folder holds it, unless a blob store is set)."""
    return session.scalar(select(BlobRow.sha256).limit(1)) is not None


def get_setting(session: Session, key: str) -> str | None:
    return session.scalar(select(SettingRow.value).where(SettingRow.key == key))


def settings(session: Session) -> dict[str, str]:
    """Every setting (one statement: opening a library reads them all at once)."""
    return {k: v for k, v in session.execute(select(SettingRow.key, SettingRow.value))}


def set_setting(session: Session, key: str, value: str) -> None:
    row = session.get(SettingRow, key)
    if row is None:
        session.add(SettingRow(key=key, value=value))
    else:
        row.value = value
    session.flush()


class ClaimLedger:
    """The object store's claims, in the shared catalog. Speaks of digests and epoch seconds only,
    so :mod:`libstore.store` can use it without SQL (it receives this object from the context)."""

    def __init__(self, engine: Engine, location: str) -> None:
        self._engine = engine
        self._location = location

    def claim(self, sha256s: Iterable[str], at: float) -> None:
        """Record that a writer claims these blobs now (committed at once, no write lock)."""
        rows = [{"sha256": sha, "claimed_at": at} for sha in sorted(set(sha256s))]
        if not rows:
            return
        from sqlalchemy.dialects import postgresql, sqlite  # upserts are per dialect; a heavy import

        dialect = postgresql if self._engine.dialect.name == "postgresql" else sqlite
        stmt = dialect.insert(BlobClaimRow).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=["sha256"], set_={"claimed_at": stmt.excluded.claimed_at}
        )
        with translate_errors(self._location, None), self._engine.begin() as conn:
            conn.execute(stmt)

    def claimed_at(self, sha256s: Iterable[str] | None = None) -> dict[str, float]:
        """digest -> its latest claim, for ``sha256s`` (every claimed blob if None)."""
        query = select(BlobClaimRow.sha256, BlobClaimRow.claimed_at)
        wanted = None if sha256s is None else sorted(set(sha256s))
        with translate_errors(self._location, None), self._engine.connect() as conn:
            if wanted is None:
                return {sha: at for sha, at in conn.execute(query)}
            found: dict[str, float] = {}
            for chunk in chunks(wanted, 500):
                found.update(
                    {sha: at for sha, at in conn.execute(query.where(BlobClaimRow.sha256.in_(chunk)))}
                )
            return found

    def forget(self, sha256s: Iterable[str]) -> None:
        """Drop the claims of blobs gc removed."""
        wanted = sorted(set(sha256s))
        with translate_errors(self._location, None), self._engine.begin() as conn:
            for part in chunks(wanted, 500):
                conn.execute(delete(BlobClaimRow).where(BlobClaimRow.sha256.in_(part)))
