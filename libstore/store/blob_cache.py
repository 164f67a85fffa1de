"""A machine's bounded, content-addressed read-through cache of an object store's blobs.

It is a :class:`~libstore.store.blobs.BlobStore` folder (``<library>/cache/sha256/..``) with a size
limit: a blob enters only through a hash-checked staged file (a download, or an upload's own staged
copy), so every file in it holds the bytes its name promises. Each use sets the entry's atime
(:meth:`BlobStore.claim`); when a fill takes the cache over its limit, the least recently used entries
go first. Entries used within :data:`PINNED_S` are kept even over the limit: another process may
have just been handed their path.

Nothing shared depends on the cache: gc and verify look at the object store, and clearing the cache
only costs downloads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from libstore.store.blob_upkeep import BlobStat
from libstore.store.blobs import BlobStore
from libstore.types import StagedBlob

#: Seconds an entry stays after its last use, whatever the limit.
PINNED_S = 60.0


@dataclass(frozen=True)
class CacheStats:
    """The cache's entries (least recently used first), their total size and the limit."""

    entries: tuple[BlobStat, ...]
    bytes: int
    max_bytes: int


class BlobCache:
    """See the module docstring."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int) -> None:
        self.store = BlobStore(root)
        self.max_bytes = max_bytes
        #: bytes cached as this process last counted them plus its fills since (None: not counted
        #: yet): a fill scans the folder only when this goes over the limit
        self._bytes: int | None = None
        self._lock = threading.Lock()

    @property
    def root(self) -> Path:
        return self.store.root

    def hit(self, sha256: str) -> Path | None:
        """The cached file of ``sha256`` (its use recorded), or None."""
        return self.store.path(sha256) if self.store.claim(sha256) else None

    def fill(self, chunks: Iterable[bytes], sha256: str, *, what: str) -> Path:
        """Cache downloaded bytes: staged while hashed (wrong bytes raise IntegrityError and leave
        nothing), then renamed to their address; evicts to the limit."""
        return self.adopt(self.store.stage_chunks(chunks, expected_sha256=sha256, what=what))

    def adopt(self, staged: StagedBlob) -> Path:
        """Move a hash-checked staged copy (of this cache's store) in; evicts to the limit."""
        ref = self.store.commit_staged(staged)
        with self._lock:
            self._bytes = self.stats().bytes if self._bytes is None else self._bytes + ref.size
            if self._bytes > self.max_bytes:
                self.evict(keep={ref.sha256})
        return self.store.path(ref.sha256)

    def stats(self) -> CacheStats:
        entries = sorted(self.store.scan().blobs.values(), key=lambda b: (b.claimed_at, b.sha256))
        return CacheStats(tuple(entries), sum(b.size for b in entries), self.max_bytes)

    def evict(self, *, keep: Iterable[str] = ()) -> list[str]:
        """Remove least recently used entries until the cache fits its limit; returns their digests."""
        stats = self.stats()
        total, keep, now, gone = stats.bytes, set(keep), time.time(), []
        for entry in stats.entries:
            if total <= self.max_bytes:
                break
            if entry.sha256 in keep or now - entry.claimed_at < PINNED_S:
                continue
            if self.store.delete(entry.sha256):
                total -= entry.size
                gone.append(entry.sha256)
        self._bytes = total
        return gone

    def clear(self) -> CacheStats:
        """Remove every entry, and temp files of fills that crashed (older than an hour: younger ones
        may be in flight); returns what was removed."""
        stats = self.stats()
        for entry in stats.entries:
            self.store.delete(entry.sha256)
        self.store.remove_temp_files()
        self._bytes = None
        return stats
