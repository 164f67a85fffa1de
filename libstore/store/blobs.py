"""Content-addressed blob store: ``<library>/blobs/sha256/<2 hex>/<64 hex>``.

A blob's name is the sha256 of its bytes, the same id the Hub's LFS uses, so sync can skip what the
other side already holds. The hash algorithm is part of the path so a later migration to another
algorithm can live beside the old blobs.

Writes are crash-safe: bytes go to ``.tmp-<pid>-<random>`` in the blob's own shard folder, are
fsynced, made read-only and renamed into place (``os.replace``), then the folder is fsynced. A crash
leaves at most a temp file, which ``remove_temp_files`` collects. A blob is never modified after it
is in place; read-only mode guards against accidents only — ``verify`` (re-hashing) is the proof of
integrity, never the file mode.

No torch here: the CLI's torch-free commands use this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from libstore.errors import IntegrityError, NotFoundError, ValidationError

ALGORITHM = "sha256"
CHUNK = 1 << 20
TEMP_PREFIX = ".tmp-"
_DIGEST = re.compile(r"[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")


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
        if not self._algo_dir.is_dir():
            return
        for shard in sorted(self._algo_dir.iterdir()):
            if not (_SHARD.fullmatch(shard.name) and shard.is_dir()):
                continue
            for entry in sorted(shard.iterdir()):
                name = entry.name
                if _DIGEST.fullmatch(name) and name.startswith(shard.name) and entry.is_file():
                    yield name

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
        """True if the blob is in place with the right size. Dedup never rewrites a good blob.

        A blob of the wrong size is corrupt (it cannot have these bytes); returning False lets the
        caller replace it atomically with the verified bytes.

        A blob re-used here is *claimed*: its atime is set to now (mtime and content untouched), so
        a concurrent ``gc`` keeps it for its grace period even if no row references it yet (the
        caller's transaction commits later). If ``gc`` removed it meanwhile, it is written anew.
        """
        path = self.path(digest)
        try:
            st = path.stat()
            if st.st_size != size:
                return False
            os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
        except FileNotFoundError:
            return False
        except OSError:  # not ours to touch (a shared store): dedup still holds
            return path.exists()
        return True

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

    def verify(self, sha256: str) -> bool:
        """True if the blob exists and its bytes still hash to its name (re-reads the file)."""
        p = self.path(sha256)
        try:
            return sha256_file(p) == sha256
        except FileNotFoundError:
            return False

    # --- removing ----------------------------------------------------------------------------

    def delete(self, sha256: str) -> bool:
        """Remove a blob (gc decides which are unreferenced). Returns False if it was absent."""
        p = self.path(sha256)
        try:
            os.chmod(p, 0o644)  # Windows refuses to delete read-only files
            p.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(p.parent)
        return True

    def temp_files(self) -> list[Path]:
        """Temp files left in shard folders (in-flight writes, or leftovers of a crash)."""
        if not self._algo_dir.is_dir():
            return []
        found: list[Path] = []
        for shard in sorted(self._algo_dir.iterdir()):
            if shard.is_dir():
                found.extend(sorted(shard.glob(f"{TEMP_PREFIX}*")))
        return found

    def remove_temp_files(self, older_than_s: float = 3600.0) -> list[Path]:
        """Delete temp files untouched for ``older_than_s`` seconds; younger ones may be in flight.

        Age, not the pid in the name, decides: the store may be shared by several hosts.
        """
        now = time.time()
        removed: list[Path] = []
        for tmp in self.temp_files():
            try:
                if now - tmp.stat().st_mtime < older_than_s:
                    continue
                os.chmod(tmp, 0o644)
                tmp.unlink()
            except FileNotFoundError:
                continue  # another gc or the writer itself got there first
            removed.append(tmp)
        return removed
