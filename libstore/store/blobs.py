"""Content-addressed blob store: ``<library>/blobs/sha256/<2 hex>/<64 hex>``.

A blob's name is the sha256 of its bytes, the same id the Hub's LFS uses, so sync can skip what the
other side already holds. The hash algorithm is part of the path so a later migration to another
algorithm can live beside the old blobs.

Writes are crash-safe: bytes go to ``.tmp-<pid>-<random>`` in the blob's own shard folder, are
fsynced, made read-only and renamed into place (``os.replace``), then the folder is fsynced. A crash
leaves at most a temp file, which ``remove_temp_files`` collects. A blob is never modified after it
is in place; read-only mode guards against accidents only — ``verify`` (re-hashing) is the proof of
integrity, never the file mode.

*Staging* (:meth:`BlobStore.stage_file`) is for files that must be validated before they are
stored: the source is read once, copied into a temp file inside the store while it is hashed, and
the caller validates that copy — the very bytes :meth:`BlobStore.commit_staged` then renames to
their address — so a source changed or swapped after the copy cannot matter. Staged temps have the
same names as write temps (in shard :data:`STAGING_SHARD`), so gc collects them after a crash once
they are older than its grace period; commit sets a staged file's mtime to now, as a write would.
A copy may be staged without its fsync (``durable=False``) so that a batch fsyncs many copies at
once (:meth:`BlobStore.make_durable`); commit fsyncs any copy that is not durable before renaming
it, so no blob gets its name before its bytes are on disk.

A write the file system refuses (read-only, full disk, quota, permissions) raises
:class:`StorageError` saying what to do, and leaves no temp file.

Re-using a stored blob (deduplication) *claims* it, so a concurrent ``gc`` keeps it; claims,
listing, re-hashing and deletion live in :mod:`libstore.store.blob_upkeep`.

No torch here: the CLI's torch-free commands use this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from libstore.errors import (
    BlobsRemovedError,
    IntegrityError,
    LibstoreError,
    NotFoundError,
    StorageError,
    ValidationError,
)
from libstore.store.blob_upkeep import (
    _DIGEST,
    ALGORITHM,
    TEMP_PREFIX,
    BlobUpkeep,
    fsync_dir,
)
from libstore.store.sources import open_regular, read_chunks, read_failed
from libstore.types import StagedBlob

CHUNK = 1 << 20
#: The shard folder staged copies are written to (their digest, hence their shard, is not known
#: before they are copied; the rename into the real shard is on the same file system).
STAGING_SHARD = "00"

_T = TypeVar("_T")


@dataclass(frozen=True)
class BlobRef:
    """A stored blob: its sha256 (64 lowercase hex) and its size in bytes."""

    sha256: str
    size: int


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


def _remove_temp(tmp: Path) -> None:
    """Best-effort removal of a temp file (on a read-only disk it stays for gc to collect)."""
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o644)  # Windows refuses to delete read-only files
        tmp.unlink()


#: Threads that fsync a batch: fsync waits on the disk, not the GIL, and the file system commits
#: concurrent fsyncs together (ext4's journal: one commit for all that wait on it).
SYNC_THREADS = 16


def _in_threads(fn: Callable[[_T], object], items: Sequence[_T]) -> None:
    """``fn(item)`` for every item, from up to :data:`SYNC_THREADS` threads (inline for one item);
    the first error is raised once all are done."""
    if len(items) <= 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(min(SYNC_THREADS, len(items))) as pool:
        list(pool.map(fn, items))


class BlobStore(BlobUpkeep):
    """Content-addressed, deduplicated, write-once file store rooted at ``<library>/blobs``.

    Listing, re-hashing, claims and deletion (what ``verify`` and ``gc`` use) are inherited from
    :class:`~libstore.store.blob_upkeep.BlobUpkeep`.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    @property
    def location(self) -> str:
        return str(self.root)

    @property
    def shared(self) -> bool:
        return False

    def fetch(self, sha256s: Iterable[str]) -> None:
        """Nothing to fetch: every blob of this store is a local file already."""

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
        except OSError as e:
            raise read_failed(src, e) from None
        if expected_sha256 is not None and digest != expected_sha256:
            raise IntegrityError(
                f"{src} has sha256 {digest} but {expected_sha256} was expected; the file is "
                f"corrupt or incomplete (download it again). Nothing was stored."
            )
        if self._already_stored(digest, size):
            return BlobRef(digest, size)

        def copy(out: BinaryIO) -> str:
            h = hashlib.sha256()
            with open_regular(src) as f:
                for chunk in read_chunks(f, src):
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

    def put_bytes_many(self, datas: Sequence[bytes | bytearray | memoryview]) -> list[BlobRef]:
        """:meth:`put_bytes` for many byte strings (e.g. the configs of an import), one ref each.

        The new ones are written to temps first and made durable together: one fsync per file from
        parallel threads (the file system commits concurrent fsyncs as one journal commit), then the
        renames and one fsync per shard folder — instead of a file and a folder fsync per blob, one
        after the other. On any error the temps are removed and nothing new is in place.
        """
        refs: list[BlobRef] = []
        staged: dict[str, StagedBlob] = {}
        with self.discarding(staged.values()):
            for data in datas:
                digest, size = sha256_bytes(data), len(data)
                refs.append(BlobRef(digest, size))
                if digest not in staged and not self._already_stored(digest, size):
                    tmp, _, _ = self._write_staged([bytes(data)], "store bytes", "bytes", sync=False)
                    staged[digest] = StagedBlob(str(tmp), digest, size, durable=False)
            self.commit_staged_many(list(staged.values()))
        return refs

    def _fsync_staged(self, staged: StagedBlob) -> None:
        """Make a staged copy's bytes durable (before it is renamed into place)."""
        try:
            fd = os.open(staged.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except FileNotFoundError:
            raise BlobsRemovedError.staged_copy_gone(staged.path, staged.sha256) from None
        except OSError as e:
            raise self._storage_error(e, f"store {staged.sha256}") from e

    def _already_stored(self, digest: str, size: int) -> bool:
        """True if the blob is in place with the right size, and now claimed. Dedup never rewrites a
        good blob; if ``gc`` removed it meanwhile, the caller writes it anew.

        A blob of the wrong size is corrupt (it cannot have these bytes); returning False lets the
        caller replace it atomically with the verified bytes.
        """
        st = self.stat(digest)
        return st is not None and st.size == size and self.claim(digest)

    def _write(self, digest: str, fill: Callable[[BinaryIO], str], *, what: str) -> None:
        """Write via ``fill(file) -> sha256`` to a temp file in the shard, check, fsync, rename."""
        final = self.path(digest)
        shard = final.parent
        tmp, out = self._create_temp(shard, what)
        try:
            with out:
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
        except OSError as e:
            raise self._storage_error(e, f"store {what}") from e
        finally:
            _remove_temp(tmp)

    def _create_temp(self, shard: Path, what: str) -> tuple[Path, BinaryIO]:
        """A new, exclusively created temp file in ``shard`` (created if needed), open for writing."""
        tmp = shard / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            try:
                fd = os.open(tmp, flags, 0o600)
            except FileNotFoundError:  # the shard's first blob: make the folder (not on every write)
                shard.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, flags, 0o600)
        except OSError as e:
            raise self._storage_error(e, f"store {what}") from e
        return tmp, os.fdopen(fd, "wb")

    def _storage_error(self, e: OSError, doing: str) -> Exception:
        """The :class:`StorageError` for a write the file system refused (libstore errors pass); a
        temp file that vanished under a write was taken by a concurrent gc: :class:`BlobsRemovedError`."""
        if isinstance(e, LibstoreError):
            return e
        where = str(self.root)
        if e.errno == errno.ENOENT and self.root.is_dir():
            return BlobsRemovedError(
                f"could not {doing}: its temp file in the blob store was removed while it was "
                f"written, by a concurrent gc with --grace 0 (or a grace period shorter than the "
                f"write). Nothing was stored; run the operation again"
            )
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            advice = (
                "the disk is full (or the quota is used up): free space — `libstore gc` removes "
                "blobs nothing references — or move the library to a bigger disk, then try again"
            )
        elif e.errno == errno.EROFS:
            advice = (
                "it is on a read-only file system: remount it read-write, or work on a copy of the "
                "library on a writable disk"
            )
        elif e.errno in (errno.EACCES, errno.EPERM):
            advice = (
                "this user may not write there: fix the folder's ownership or permissions, or run "
                "as the user who owns the library"
            )
        else:
            advice = "check the disk and the folder, then try again"
        return StorageError(
            f"could not {doing} in the blob store {where} ({e.strerror or e}); {advice}. Nothing was stored.",
            location=where,
        )

    # --- staging -----------------------------------------------------------------------------

    def stage_file(
        self,
        src: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
        durable: bool = True,
    ) -> StagedBlob:
        """Copy ``src`` once into a temp file inside the store, hashing the bytes as they are copied.

        With ``durable=False`` the copy is not fsynced (``result.durable`` is false): an import of
        many files validates them first and then fsyncs them all at once with :meth:`make_durable`.

        Validate the returned copy (its ``path``), then :meth:`commit_staged` or :meth:`discard` it;
        the caller owns it until then (``discard`` is always safe to call, also after a commit).
        ``src`` must be a regular file (or a symlink to one); anything else, a read error or more
        than ``max_bytes`` bytes raises :class:`ValidationError`, a hash other than
        ``expected_sha256`` :class:`IntegrityError`, a refused write :class:`StorageError` — and
        then no temp file is left.
        """
        if expected_sha256 is not None:
            check_digest(expected_sha256)
        with open_regular(src) as f:
            tmp, digest, size = self._write_staged(
                read_chunks(f, src, limit=max_bytes), f"copy {src}", src, sync=durable
            )
        if expected_sha256 is not None and digest != expected_sha256:
            _remove_temp(tmp)
            raise IntegrityError(
                f"{src} has sha256 {digest} but {expected_sha256} was expected; the file is corrupt "
                f"or incomplete (download it again). Nothing was stored.",
                sha256=expected_sha256,
                path=str(src),
            )
        return StagedBlob(path=str(tmp), sha256=digest, size=size, durable=durable)

    def make_durable(self, staged: Sequence[StagedBlob]) -> list[StagedBlob]:
        """fsync the staged copies that are not durable yet, from parallel threads (the file system
        commits concurrent fsyncs together: far fewer journal commits than one file after another);
        returns them marked durable, for :meth:`commit_staged_many`."""
        _in_threads(self._fsync_staged, [s for s in staged if not s.durable])
        return [s if s.durable else dataclasses.replace(s, durable=True) for s in staged]

    def stage_chunks(self, chunks: Iterable[bytes], *, expected_sha256: str, what: str) -> StagedBlob:
        """Write ``chunks`` (a download) to a staged temp file while hashing them; bytes that hash
        to anything but ``expected_sha256`` raise :class:`IntegrityError` and leave no temp file."""
        check_digest(expected_sha256)
        tmp, digest, size = self._write_staged(chunks, f"copy {what}", what)
        if digest != expected_sha256:
            _remove_temp(tmp)
            raise IntegrityError(
                f"{what} has sha256 {digest} but {expected_sha256} was expected: the server "
                f"returned wrong bytes; nothing was stored",
                sha256=expected_sha256,
                path=what,
            )
        return StagedBlob(path=str(tmp), sha256=expected_sha256, size=size)

    def _write_staged(
        self, chunks: Iterable[bytes], action: str, what: object, *, sync: bool = True
    ) -> tuple[Path, str, int]:
        """Write ``chunks`` to a new read-only temp file in the staging shard while hashing them:
        (its path, sha256, size); fsynced unless ``sync`` is false (then the caller fsyncs it before
        it is committed). On any error no temp file is left; OS errors are :class:`StorageError`
        saying ``action``."""
        tmp, out = self._create_temp(self._algo_dir / STAGING_SHARD, f"a copy of {what}")
        h = hashlib.sha256()
        size = 0
        try:
            with out:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                if sync:
                    os.fsync(out.fileno())
            os.chmod(tmp, 0o444)
        except BaseException as e:
            _remove_temp(tmp)
            if isinstance(e, OSError):
                raise self._storage_error(e, action) from e
            raise
        return tmp, h.hexdigest(), size

    def commit_staged(self, staged: StagedBlob) -> BlobRef:
        """Move a staged copy to its content address; if that blob is already stored, claim it and
        drop the copy. A :class:`StagedBlob` naming a blob already in place is claimed."""
        return self.commit_staged_many([staged])[0]

    def commit_staged_many(self, staged: Sequence[StagedBlob]) -> list[BlobRef]:
        """:meth:`commit_staged` for many copies. Those to be renamed that are not durable yet are
        fsynced first (all together, :meth:`make_durable`), then renamed, then each shard folder
        touched is fsynced once (not once per blob), before returning — so the catalog records
        them only once bytes and names are durable. Repeats of one digest are renamed once."""
        moves: dict[str, StagedBlob] = {}
        for item in staged:
            final = self.path(item.sha256)
            tmp = Path(item.path)
            if item.sha256 in moves or self._already_stored(item.sha256, item.size):
                if tmp != final and moves.get(item.sha256) is not item:
                    self.discard(item)
                continue
            if tmp == final or not tmp.name.startswith(TEMP_PREFIX):
                raise self._missing(item.sha256)
            moves[item.sha256] = item
        shards: set[Path] = set()
        for item in self.make_durable(list(moves.values())):
            final = self.path(item.sha256)
            tmp = Path(item.path)
            try:
                os.utime(tmp)  # claimed now: gc counts an unreferenced blob's age from its mtime
                try:
                    os.replace(tmp, final)
                except FileNotFoundError:  # the shard's first blob (or gc took the copy: raised below)
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, final)
                shards.add(final.parent)
            except FileNotFoundError:
                raise BlobsRemovedError.staged_copy_gone(str(tmp), item.sha256) from None
            except OSError as e:
                self.discard(item)
                raise self._storage_error(e, f"store {item.sha256}") from e
        _in_threads(fsync_dir, list(shards))
        return [BlobRef(item.sha256, item.size) for item in staged]

    @contextlib.contextmanager
    def discarding(self, staged: Iterable[StagedBlob]) -> Iterator[None]:
        """Discard the staged copies in ``staged`` on leaving (read at exit, so a list may grow
        inside); the ones committed meanwhile are already gone."""
        try:
            yield
        finally:
            for item in staged:
                self.discard(item)

    def discard(self, staged: StagedBlob) -> None:
        """Drop a staged copy. A no-op once it was committed or discarded (never removes a blob)."""
        tmp = Path(staged.path)
        if tmp.name.startswith(TEMP_PREFIX) and tmp.parent.parent == self._algo_dir:
            _remove_temp(tmp)

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
