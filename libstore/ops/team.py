"""Team-library operations: this machine's blob cache, and moving a library's blobs to an object store.

``migrate_blobs`` turns a single user's library into a team library: every local blob is re-hashed,
uploaded (idempotent: an object already there with the right size is kept), checked by listing the
bucket, and only then is the object store recorded in the catalog; the local files become this
machine's cache. Run it again after an interruption: uploaded blobs are skipped. Run it while nothing
else writes to the library (a blob stored locally by a concurrent import could be left behind;
``verify`` would report it).
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass

from libstore.catalog import team
from libstore.errors import IntegrityError, StorageError, ValidationError
from libstore.ops.context import Context, object_backend
from libstore.store.blob_cache import BlobCache, CacheStats
from libstore.store.blobs import BlobStore
from libstore.store.object_store import ObjectBlobStore, parse_url

WORKERS = 8

__all__ = ["CacheStats", "MigrateReport", "cache_clear", "cache_stats", "migrate_blobs"]


def _cache(ctx: Context) -> BlobCache:
    if not isinstance(ctx.blobs, ObjectBlobStore):
        raise ValidationError(
            f"the library at {ctx.path} keeps its blobs in its own folder; only a team library (one "
            f"whose catalog names an object store) has a cache — see: libstore blobs migrate --help"
        )
    return ctx.blobs.cache


def cache_stats(ctx: Context) -> CacheStats:
    """This machine's cache of the object store: entries (least recently used first) and sizes."""
    return _cache(ctx).stats()


def cache_clear(ctx: Context) -> CacheStats:
    """Empty this machine's cache (nothing shared changes; blobs are downloaded again when used)."""
    return _cache(ctx).clear()


@dataclass(frozen=True)
class MigrateReport:
    """What ``blobs migrate`` did: blobs uploaded now, already in the store (an earlier, interrupted
    run), their total size, and the object store the catalog now names."""

    url: str
    uploaded: tuple[str, ...]
    present: tuple[str, ...]
    bytes: int


def migrate_blobs(ctx: Context, *, to: str) -> MigrateReport:
    """Move the library folder's blobs to the object store ``to`` (resumable, verified)."""
    parse_url(to)
    with ctx.catalog.read() as s:
        current = team.get_setting(s, team.BLOB_STORE)
    if current is not None and current != to:
        raise ValidationError(f"this library's blobs are already in {current}", field="to")
    local = BlobStore(ctx.path / "blobs")
    dest = object_backend(ctx.path, ctx.catalog, to)
    scan = local.scan()
    present = set(dest.scan().blobs)

    def upload(sha: str) -> str:
        if sha in present:
            return sha
        if local.digest(sha) != sha:
            raise IntegrityError(
                f"blob {sha} of {ctx.path} is corrupt; nothing of it was uploaded. Run: libstore verify "
                f"--repair, re-add the expert that needs it, then migrate again",
                sha256=sha,
            )
        dest.put_file(local.path(sha), expected_sha256=sha)
        return sha

    with cf.ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(upload, scan.blobs))
    listed = dest.scan().blobs
    wrong = [sha for sha, st in scan.blobs.items() if sha not in listed or listed[sha].size != st.size]
    if wrong:
        raise StorageError(
            f"{len(wrong)} blob(s) are not in {to} after the upload (e.g. {wrong[0]}); the library still "
            f"uses its own folder — run the migration again",
            location=to,
        )
    with ctx.catalog.write() as s:
        team.set_setting(s, team.BLOB_STORE, to)
    for sha in scan.blobs:  # now served by the object store, and cached here
        local.delete(sha)
    ctx.blobs = dest
    return MigrateReport(
        url=to,
        uploaded=tuple(sorted(set(scan.blobs) - present)),
        present=tuple(sorted(set(scan.blobs) & present)),
        bytes=sum(st.size for st in scan.blobs.values()),
    )
