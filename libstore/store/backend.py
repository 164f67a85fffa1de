"""The blob store interface operations use: :class:`BlobBackend`, with two implementations.

* :class:`~libstore.store.blobs.BlobStore` — the library folder's own ``blobs/`` (the default);
* :class:`~libstore.store.object_store.ObjectBlobStore` — an object store (``s3://bucket/prefix``)
  shared by a team, read through each machine's bounded cache.

Both keep the same rules: a blob is named by the sha256 of its bytes and becomes visible under that
name only when complete and hash-checked; re-using a stored blob claims it, so a concurrent gc (on
any machine) keeps it for its grace period; ``path`` is a local file holding the blob's bytes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, Protocol

from libstore.store.blob_upkeep import BlobStat, StoreScan
from libstore.store.leftovers import Leftover
from libstore.types import StagedBlob


class StoredRef(Protocol):
    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...


class BlobBackend(Protocol):
    """What an operation may ask of a blob store (see the module docstring)."""

    @property
    def root(self) -> Path:
        """Where this store keeps its local files (the blob folder, or an object store's cache)."""

    @property
    def location(self) -> str:
        """The store as messages and reports name it (a folder or an ``s3://`` URL)."""

    @property
    def shared(self) -> bool:
        """True for a store other machines use too (its listing is not this machine's files)."""

    def path(self, sha256: str) -> Path:
        """A local file holding the blob (fetched into the cache first for an object store)."""

    def fetch(self, sha256s: Iterable[str]) -> None:
        """Make the blobs local ahead of reading them (in parallel); a no-op for the folder store."""

    def exists(self, sha256: str) -> bool: ...
    def __contains__(self, sha256: object) -> bool: ...
    def size(self, sha256: str) -> int: ...
    def stat(self, sha256: str) -> BlobStat | None: ...
    def open(self, sha256: str) -> BinaryIO: ...
    def read_bytes(self, sha256: str) -> bytes: ...
    def put_file(self, path: str | os.PathLike[str], *, expected_sha256: str | None = None) -> StoredRef: ...
    def put_bytes(
        self, data: bytes | bytearray | memoryview, *, expected_sha256: str | None = None
    ) -> StoredRef: ...
    def put_bytes_many(self, datas: Sequence[bytes | bytearray | memoryview]) -> Sequence[StoredRef]:
        """``put_bytes`` of each (one ref each, in order), made durable as one batch."""

    def stage_file(
        self,
        src: str | os.PathLike[str],
        *,
        expected_sha256: str | None = None,
        max_bytes: int | None = None,
        durable: bool = True,
    ) -> StagedBlob: ...
    def make_durable(self, staged: Sequence[StagedBlob]) -> list[StagedBlob]:
        """fsync the staged copies made with ``durable=False``, all together; returns them durable."""

    def commit_staged(self, staged: StagedBlob) -> StoredRef: ...
    def commit_staged_many(self, staged: Sequence[StagedBlob]) -> Sequence[StoredRef]: ...
    def discard(self, staged: StagedBlob) -> None: ...
    def discarding(self, staged: Iterable[StagedBlob]) -> contextlib.AbstractContextManager[None]: ...
    def claim(self, sha256: str) -> bool: ...
    def claim_all(self, sha256s: Iterable[str]) -> None: ...
    def digest(self, sha256: str) -> str: ...
    def verify(self, sha256: str) -> bool: ...
    def delete(self, sha256: str, *, unless_claimed_within_s: float | None = None) -> bool: ...
    def scan(self) -> StoreScan: ...
    def settle(self, leftover: Leftover, *, grace_s: float, now: float | None = None) -> str | None: ...
    def quarantine(self, sha256: str, folder: str | os.PathLike[str]) -> Path | None: ...
    def temp_files(self) -> list[Path]: ...
    def remove_temp_files(self, older_than_s: float = 3600.0) -> list[Path]: ...
    def __iter__(self) -> Iterator[str]: ...
