"""Content-addressed blob store: ``<library>/blobs/sha256/<2 hex>/<64 hex>``.

A blob's name is the sha256 of its bytes, the same id the Hub's LFS uses, so sync can skip what the
other side already holds. The hash algorithm is part of the path so a later migration to another
algorithm can live beside the old blobs.

Writes are crash-safe: bytes go to ``.tmp-<pid>-<random>`` in the blob's own shard folder, are
fsynced, made read-only and renamed into place (``os.replace``), then the folder is fsynced. A crash
leaves at most a temp file, which ``remove_temp_files`` collects. A blob is never modified after it
is in place; read-only mode guards against accidents only — ``verify`` (re-hashing) is the proof of
integrity, never the file mode.

**Claims.** An operation stores (or re-uses) blobs before the catalog transaction that references
them commits, so ``gc`` must not take an unreferenced blob that a writer is about to record. A blob
is *claimed* when it is written (its mtime) and whenever a writer re-uses it (:meth:`BlobStore.claim`
sets its atime; content and mtime are untouched): gc keeps what was claimed within its grace period.
A writer re-claims its blobs inside the transaction that records them (:meth:`BlobStore.claim_all`),
and gc deletes inside its own write transaction, so a blob gc took meanwhile is reported
(:class:`~libstore.errors.BlobsRemovedError`) rather than recorded. Deletion renames the file to a
tombstone first and then re-reads its times, so a claim made just before the rename puts it back.

The methods maintenance uses (``scan``, ``stat``, ``digest``, ``claim``, ``delete``, ``settle``,
``quarantine``, ``checkout``) speak of digests, sizes, times and :class:`Leftover` records rather than of
folders, so an object-store backend can offer the same interface.

No torch here: the CLI's torch-free commands use this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from libstore.errors import BlobsRemovedError, IntegrityError, NotFoundError, ValidationError
from libstore.store.leftovers import Leftover, remove_if_older, remove_path

ALGORITHM = "sha256"
CHUNK = 1 << 20
TEMP_PREFIX = ".tmp-"
#: A blob gc is deleting: ``.gc-<digest>-<random>`` in its shard (put back if claimed meanwhile).
TOMB_PREFIX = ".gc-"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")


@dataclass(frozen=True)
class BlobRef:
    """A stored blob: its sha256 (64 lowercase hex) and its size in bytes."""

    sha256: str
    size: int


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


def check_digest(sha256: object) -> str:
    """``sha256`` itself if it is 64 lowercase hex characters: paths are built from nothing else."""
    if not isinstance(sha256, str) or not _DIGEST.fullmatch(sha256):
        raise ValidationError(
            f"{sha256!r} is not a sha256 digest: expected 64 lowercase hex characters (0-9, a-f)"
        )
    return sha256


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 hex digest of a file's bytes, read in chunks (files may be GBs)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, ALGORITHM).hexdigest()


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """The sha256 hex digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


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


class BlobStore:
    """Content-addressed, deduplicated, write-once file store rooted at ``<library>/blobs``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    # --- addressing --------------------------------------------------------------------------

    @property
    def _algo_dir(self) -> Path:
        return self.root / ALGORITHM

    def path(self, sha256: str) -> Path:
        """Where blob ``sha256`` lives (whether or not it exists). Refuses anything but a digest."""
        digest = check_digest(sha256)
        return self._algo_dir / digest[:2] / digest

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def __contains__(self, sha256: object) -> bool:
        return isinstance(sha256, str) and _DIGEST.fullmatch(sha256) is not None and self.exists(sha256)

    def size(self, sha256: str) -> int:
        """Size in bytes of a stored blob."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError:
            raise self._missing(sha256) from None

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

    # --- writing -----------------------------------------------------------------------------

    def put_file(self, path: str | os.PathLike[str], *, expected_sha256: str | None = None) -> BlobRef:
        """Store a file's bytes; returns the existing blob when the content is already stored.

        With ``expected_sha256`` (e.g. the hash a Hub pull promised) bytes that hash differently
        raise :class:`IntegrityError` and nothing is stored. The source is hashed before anything is
        written, so a duplicate costs one read and no write; a source that changes while it is
        copied is detected by hashing the copy again.
        """
        src = Path(path)
        if expected_sha256 is not None:
            check_digest(expected_sha256)
        try:
            digest = sha256_file(src)
            size = src.stat().st_size
        except IsADirectoryError:
            raise ValidationError(f"{src} is a folder; a blob is one file") from None
        except FileNotFoundError:
            raise ValidationError(f"{src} does not exist; nothing was stored") from None
        if expected_sha256 is not None and digest != expected_sha256:
            raise IntegrityError(
                f"{src} has sha256 {digest} but {expected_sha256} was expected; the file is "
                f"corrupt or incomplete (download it again). Nothing was stored."
            )
        if self._already_stored(digest, size):
            return BlobRef(digest, size)

        def copy(out: BinaryIO) -> str:
            h = hashlib.sha256()
            with open(src, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            return h.hexdigest()

        self._write(digest, copy, what=str(src))
        return BlobRef(digest, size)

    def put_bytes(
        self, data: bytes | bytearray | memoryview, *, expected_sha256: str | None = None
    ) -> BlobRef:
        """Store ``data``; same contract as :meth:`put_file`."""
        if expected_sha256 is not None:
            check_digest(expected_sha256)
        data = bytes(data)
        digest = sha256_bytes(data)
        if expected_sha256 is not None and digest != expected_sha256:
            raise IntegrityError(
                f"bytes have sha256 {digest} but {expected_sha256} was expected; "
                f"they are corrupt or incomplete. Nothing was stored."
            )
        if self._already_stored(digest, len(data)):
            return BlobRef(digest, len(data))

        def copy(out: BinaryIO) -> str:
            out.write(data)
            return digest

        self._write(digest, copy, what="bytes")
        return BlobRef(digest, len(data))

    def _already_stored(self, digest: str, size: int) -> bool:
        """True if the blob is in place with the right size, and now claimed. Dedup never rewrites a
        good blob; if ``gc`` removed it meanwhile, the caller writes it anew.

        A blob of the wrong size is corrupt (it cannot have these bytes); returning False lets the
        caller replace it atomically with the verified bytes.
        """
        st = self.stat(digest)
        return st is not None and st.size == size and self.claim(digest)

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
            raise BlobsRemovedError(
                f"{len(gone)} blob(s) this operation stored were removed by a concurrent gc before "
                f"they were recorded (e.g. {gone[0]}); nothing was changed — run it again, and give "
                f"gc a grace period (--grace) longer than the operation takes",
                sha256s=tuple(gone),
            )

    def _write(self, digest: str, fill: Callable[[BinaryIO], str], *, what: str) -> None:
        """Write via ``fill(file) -> sha256`` to a temp file in the shard, check, fsync, rename."""
        final = self.path(digest)
        shard = final.parent
        shard.mkdir(parents=True, exist_ok=True)
        tmp = shard / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                written = fill(out)
                out.flush()
                os.fsync(out.fileno())
            if written != digest:
                raise IntegrityError(
                    f"{what} changed while it was being stored (sha256 {digest} before, "
                    f"{written} while copying); nothing was stored — retry when it is stable"
                )
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            fsync_dir(shard)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    # --- reading -----------------------------------------------------------------------------

    def _missing(self, sha256: str) -> NotFoundError:
        return NotFoundError(
            f"blob {sha256} is not in the store ({self.path(sha256)}); it was deleted or never "
            f"stored — run: libstore verify, then re-add or pull the expert that needs it"
        )

    def open(self, sha256: str) -> BinaryIO:
        """Open a stored blob for binary reading."""
        try:
            return open(self.path(sha256), "rb")
        except FileNotFoundError:
            raise self._missing(sha256) from None

    def read_bytes(self, sha256: str) -> bytes:
        with self.open(sha256) as f:
            return f.read()

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

    @contextlib.contextmanager
    def checkout(
        self, files: Mapping[str, str], *, dir: str | os.PathLike[str], prefix: str
    ) -> Iterator[Path]:
        """A temp folder (``prefix`` + random, in ``dir``) holding ``files`` (name -> digest) for
        readers that need a folder of files, such as the adapter validator; removed afterwards.

        Files are hard links to the blobs, or copies where links cannot be made (another
        filesystem). A blob not in place raises :class:`NotFoundError`.
        """
        folder = Path(tempfile.mkdtemp(prefix=prefix, dir=dir))
        try:
            for name, sha in files.items():
                src, out = self.path(sha), folder / name
                try:
                    try:
                        os.link(src, out)
                    except FileNotFoundError:
                        raise
                    except OSError:  # no hard links here: copy
                        shutil.copyfile(src, out)
                except FileNotFoundError:
                    raise self._missing(sha) from None
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

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
