"""The blob store's upkeep: listing, re-hashing, claims, deletion and leftovers — what ``verify`` and
``gc`` ask of a blob store. :class:`~libstore.store.blobs.BlobStore` inherits it.

**Claims.** An operation stores (or re-uses) blobs before the catalog transaction that references
them commits, so ``gc`` must not take an unreferenced blob that a writer is about to record. A blob
is *claimed* when it is written (its mtime) and whenever a writer re-uses it (:meth:`BlobStore.claim`
sets its atime; content and mtime are untouched): gc keeps what was claimed within its grace period.
A writer re-claims its blobs inside the transaction that records them (:meth:`BlobStore.claim_all`),
and gc deletes inside its own write transaction, so a blob gc took meanwhile is reported
(:class:`~libstore.errors.BlobsRemovedError`) rather than recorded. Deletion renames the file to a
tombstone first and then re-reads its times, so a claim made just before the rename puts it back.

These methods speak of digests, sizes, claim times and :class:`Leftover` records, not of folders,
so that an object-store backend can offer the same interface (its claims and tombstones kept in
object metadata or in the catalog).
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from libstore.errors import BlobsRemovedError, NotFoundError
from libstore.store.leftovers import Leftover, remove_if_older, remove_path

ALGORITHM = "sha256"
#: A write in flight (or a crash's leftover): ``.tmp-<pid>-<random>`` in a shard.
TEMP_PREFIX = ".tmp-"
#: A blob gc is deleting: ``.gc-<digest>-<random>`` in its shard (put back if claimed meanwhile).
TOMB_PREFIX = ".gc-"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")


@dataclass(frozen=True)
class BlobStat:
    """A stored blob's size and when it was last written or claimed (epoch seconds): gc's grace
    period counts from ``claimed_at``."""

    sha256: str
    size: int
    claimed_at: float


@dataclass(frozen=True)
class StoreScan:
    """One listing of the store.

    Attributes:
        blobs: digest -> its stat, for every blob in place.
        leftovers: temp files of writes and tombstones of gcs (in flight, or left by a crash).
        stray: locations of entries that are neither (never touched; verify reports them).
    """

    blobs: dict[str, BlobStat]
    leftovers: tuple[Leftover, ...]
    stray: tuple[str, ...]


_Entry = Literal["blob", "temp", "tombstone", "stray"]


def fsync_dir(folder: Path) -> None:
    """Persist a rename: fsync the folder that holds the new entry (a no-op where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class BlobUpkeep(abc.ABC):
    """The upkeep half of a blob store, on top of its addressing (:meth:`path`)."""

    @property
    @abc.abstractmethod
    def _algo_dir(self) -> Path: ...

    @abc.abstractmethod
    def path(self, sha256: str) -> Path:
        """Where blob ``sha256`` lives (whether or not it exists)."""

    @abc.abstractmethod
    def _missing(self, sha256: str) -> NotFoundError: ...

    def __iter__(self) -> Iterator[str]:
        """Every stored digest, sorted; temp files and stray names are skipped."""
        for kind, path, _st in self._entries():
            if kind == "blob":
                yield path.name

    def stat(self, sha256: str) -> BlobStat | None:
        """Size and claim time of a stored blob; ``None`` if it is not in place."""
        try:
            st = self.path(sha256).stat()
        except FileNotFoundError:
            return None
        return BlobStat(sha256, st.st_size, _claimed_at(st))

    def scan(self) -> StoreScan:
        """Every entry of the store, classified, with the stats gc and verify need (one listing)."""
        blobs: dict[str, BlobStat] = {}
        leftovers: list[Leftover] = []
        stray: list[str] = []
        for kind, path, st in self._entries():
            if kind == "blob":
                blobs[path.name] = BlobStat(path.name, st.st_size, _claimed_at(st))
            elif kind == "temp":
                leftovers.append(Leftover(str(path), "temp", st.st_mtime))
            elif kind == "tombstone":
                leftovers.append(Leftover(str(path), "tombstone", _claimed_at(st)))
            else:
                stray.append(str(path))
        return StoreScan(blobs, tuple(leftovers), tuple(stray))

    def _entries(self) -> Iterator[tuple[_Entry, Path, os.stat_result]]:
        """Every entry below ``sha256/`` in sorted order, classified (never following symlinks)."""
        if not self._algo_dir.is_dir():
            return
        for shard in sorted(self._algo_dir.iterdir()):
            try:
                st = shard.lstat()
            except FileNotFoundError:
                continue
            if not (_SHARD.fullmatch(shard.name) and stat.S_ISDIR(st.st_mode)):
                yield "stray", shard, st
                continue
            for entry in sorted(shard.iterdir()):
                name = entry.name
                try:
                    st = entry.lstat()
                except FileNotFoundError:
                    continue  # removed meanwhile (a finished write, a concurrent gc)
                if name.startswith(TEMP_PREFIX):
                    yield "temp", entry, st
                elif name.startswith(TOMB_PREFIX):
                    yield "tombstone", entry, st
                elif _DIGEST.fullmatch(name) and name.startswith(shard.name) and stat.S_ISREG(st.st_mode):
                    yield "blob", entry, st
                else:
                    yield "stray", entry, st

    # --- claims ------------------------------------------------------------------------------

    def claim(self, sha256: str) -> bool:
        """Claim a stored blob for a write that will reference it; False if it is not in place.

        Every path that re-uses a stored blob instead of writing it must claim it first: a
        concurrent ``gc`` then keeps it for its grace period although no row references it yet.
        The claim sets the blob's atime to now (content and mtime untouched).
        """
        path = self.path(sha256)
        try:
            st = path.stat()
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
        except FileNotFoundError:
            return False
        except OSError:  # not ours to touch (a shared store): it can only be re-used as it is
            return path.exists()
        return True

    def claim_all(self, sha256s: Iterable[str]) -> None:
        """Re-claim the blobs a write is about to record; call it inside the write transaction.

        gc deletes inside its own write transaction, so a blob found here stays until this
        transaction has committed the rows that reference it. Raises
        :class:`~libstore.errors.BlobsRemovedError` if gc took some meanwhile (the write staged them
        for longer than gc's grace period, or gc ran with ``--grace 0``): nothing may be recorded.
        """
        gone = sorted({sha for sha in sha256s if not self.claim(sha)})
        if gone:
            raise BlobsRemovedError.taken_before_recorded(gone)

    def digest(self, sha256: str) -> str:
        """The sha256 of the blob's bytes as stored now (re-reads the file), without touching its
        atime where the OS allows: reading must not count as a claim."""
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
        path = self.path(sha256)
        try:
            try:
                fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
            except PermissionError:  # O_NOATIME needs ownership
                fd = os.open(path, flags)
        except FileNotFoundError:
            raise self._missing(sha256) from None
        with os.fdopen(fd, "rb") as f:
            return hashlib.file_digest(f, ALGORITHM).hexdigest()

    def verify(self, sha256: str) -> bool:
        """True if the blob exists and its bytes still hash to its name (re-reads the file)."""
        try:
            return self.digest(sha256) == sha256
        except NotFoundError:
            return False

    # --- removing ----------------------------------------------------------------------------

    def delete(self, sha256: str, *, unless_claimed_within_s: float | None = None) -> bool:
        """Remove a blob; True if this call removed it, False if it was not in place.

        gc passes ``unless_claimed_within_s`` (its grace period) and calls this inside its write
        transaction: a blob claimed more recently is kept (False). The file is first renamed to a
        tombstone, so a writer arriving later finds no blob (and writes it anew, or reports it);
        then the tombstone's times are read: a writer that claimed the blob just before the rename
        left a fresh atime, and the tombstone is put back.
        """
        final = self.path(sha256)
        tomb = final.with_name(f"{TOMB_PREFIX}{sha256}-{secrets.token_hex(4)}")
        try:
            os.rename(final, tomb)
        except FileNotFoundError:
            return False
        if unless_claimed_within_s is not None:
            try:
                st = tomb.stat()
            except FileNotFoundError:  # a concurrent gc settled it
                return True
            if time.time() - _claimed_at(st) < unless_claimed_within_s:
                _restore(tomb, final)
                return False
        remove_path(tomb)
        fsync_dir(final.parent)
        return True

    def settle(self, leftover: Leftover, *, grace_s: float, now: float | None = None) -> str | None:
        """Deal with a leftover of :meth:`scan`: a temp file older than ``grace_s`` is removed; a
        tombstone (of a gc that crashed) is put back if its blob was claimed within ``grace_s``,
        removed otherwise. Returns what was done, or None."""
        now = time.time() if now is None else now
        path = Path(leftover.location)
        if leftover.kind == "temp":
            return "removed" if remove_if_older(leftover, grace_s, now) else None
        sha = path.name[len(TOMB_PREFIX) :].split("-", 1)[0]
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        if _DIGEST.fullmatch(sha) and now - _claimed_at(st) < grace_s:
            _restore(path, self.path(sha))
            return "put back (claimed within the grace period)"
        remove_path(path)
        return "removed"

    def quarantine(self, sha256: str, folder: str | os.PathLike[str]) -> Path | None:
        """Move a blob out of the store into ``folder`` (kept for inspection, never deleted), so
        that storing its digest again writes the right bytes; None if it was not in place."""
        src, dest_dir = self.path(sha256), Path(folder)
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / f"{sha256}.{int(time.time())}-{secrets.token_hex(4)}"
        try:
            os.replace(src, dest)
        except FileNotFoundError:
            return None
        fsync_dir(src.parent)
        return dest

    def temp_files(self) -> list[Path]:
        """Temp files left in shard folders (in-flight writes, or leftovers of a crash)."""
        return [path for kind, path, _st in self._entries() if kind == "temp"]

    def remove_temp_files(self, older_than_s: float = 3600.0) -> list[Path]:
        """Delete temp files untouched for ``older_than_s`` seconds; younger ones may be in flight.

        Age, not the pid in the name, decides: the store may be shared by several hosts.
        """
        now = time.time()
        return [
            path
            for kind, path, st in self._entries()
            if kind == "temp" and remove_if_older(Leftover(str(path), "temp", st.st_mtime), older_than_s, now)
        ]


def _claimed_at(st: os.stat_result) -> float:
    """When a blob was last written or claimed: its mtime, or the atime a claim sets."""
    return max(st.st_mtime, st.st_atime)


def _restore(tomb: Path, final: Path) -> None:
    """Put a tombstone back as its blob, unless a writer has stored the blob anew meanwhile."""
    try:
        os.link(tomb, final)
    except FileExistsError:
        pass
    except OSError:  # no hard links here: rename unless a new blob took the name
        if not final.exists():
            with contextlib.suppress(FileNotFoundError):
                os.rename(tomb, final)
                fsync_dir(final.parent)
                return
    with contextlib.suppress(FileNotFoundError):
        tomb.unlink()
    fsync_dir(final.parent)
