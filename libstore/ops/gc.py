"""``gc``: remove unreferenced blobs (file and row), prototype caches of weights no expert has any
more, and stale temp entries. Safe beside concurrent writers (see :mod:`libstore.ops.maintenance`):

* an unreferenced blob claimed within the grace period is kept: a writer stored or re-used it and
  has not committed the rows that reference it yet;
* blobs are deleted inside a write transaction that re-checks their references (writers are
  serialised), so a writer records a blob either before — and gc keeps it — or after, and then its
  own re-claim finds the blob gone and it fails instead of recording it;
* the store deletes through a tombstone and re-reads the blob's times (``BlobStore.delete``), so a
  claim made just before gc takes the file puts it back; a tombstone left by a crash is put back if
  its blob was claimed within the grace period and removed otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from libstore.catalog import maintenance as cat_maint
from libstore.catalog import prototypes as cache
from libstore.catalog import repo
from libstore.errors import ValidationError
from libstore.ops.context import Context
from libstore.ops.maintenance import DEFAULT_GRACE_S, library_leftovers, shown
from libstore.store.blob_upkeep import BlobStat
from libstore.store.leftovers import remove_if_older
from libstore.types import PrototypeSet

#: Blobs deleted per write transaction: the write lock is released between batches.
BATCH = 500


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed (or, with ``dry_run``, would remove).

    Attributes:
        blobs: unreferenced blobs removed (digests).
        bytes_freed: their total size.
        caches: prototype cache entries of weights no expert has any more.
        temp: temp files and folders removed (paths relative to the library).
        kept: unreferenced blobs kept because they were claimed within the grace period.
        grace_s: the grace period used.
    """

    dry_run: bool
    grace_s: float
    blobs: tuple[str, ...] = ()
    bytes_freed: int = 0
    caches: tuple[PrototypeSet, ...] = ()
    temp: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


def gc(ctx: Context, *, dry_run: bool = False, grace_s: float = DEFAULT_GRACE_S) -> GcReport:
    """Remove unreferenced blobs (file and row), orphaned prototype caches and stale temp entries.

    Blobs and temp entries claimed within ``grace_s`` seconds are kept (see the module docstring).
    ``dry_run`` lists what would go and changes nothing.
    """
    if not grace_s >= 0:  # also NaN
        raise ValidationError(f"grace must be a non-negative number of seconds, got {grace_s}")
    now = time.time()
    # 1. caches of weights no expert has: their blobs then become unreferenced
    if dry_run:
        with ctx.catalog.read() as s:
            caches = cache.orphaned(s)
    else:
        with ctx.catalog.write() as s:
            caches = cache.delete_orphaned(s)

    # 2. unreferenced blobs claimed before the grace period
    with ctx.catalog.read() as s:  # a dry run counts the orphaned caches' blobs as freed
        referenced = cat_maint.live_references(s) if dry_run else repo.referenced_blobs(s)
        rows = cat_maint.blob_sizes(s)
    scan = ctx.blobs.scan()
    candidates: list[str] = []
    kept: list[str] = []
    for sha in sorted((set(rows) | set(scan.blobs)) - referenced):
        st = scan.blobs.get(sha)
        if st is not None and now - st.claimed_at < grace_s:
            kept.append(sha)
        else:
            candidates.append(sha)
    if dry_run:
        removed = candidates
        freed = sum(scan.blobs[sha].size for sha in candidates if sha in scan.blobs)
    else:
        removed, freed = [], 0
        for i in range(0, len(candidates), BATCH):
            gone, size, claimed = _delete_batch(ctx, candidates[i : i + BATCH], scan.blobs, grace_s)
            removed.extend(gone)
            freed += size
            kept.extend(claimed)

    # 3. temp entries of writes that crashed (older than the grace period), tombstones of gcs
    temp: list[str] = []
    for lo in library_leftovers(ctx):
        if now - lo.modified_at >= grace_s and (dry_run or remove_if_older(lo, grace_s, now)):
            temp.append(shown(ctx, lo.location))
    for lo in scan.leftovers:
        if lo.kind == "temp" and now - lo.modified_at < grace_s:
            continue
        if dry_run or ctx.blobs.settle(lo, grace_s=grace_s, now=now):
            temp.append(shown(ctx, lo.location))
    return GcReport(
        dry_run=dry_run,
        grace_s=grace_s,
        blobs=tuple(removed),
        bytes_freed=freed,
        caches=tuple(caches),
        temp=tuple(sorted(temp)),
        kept=tuple(sorted(kept)),
    )


def _delete_batch(
    ctx: Context, batch: list[str], stats: Mapping[str, BlobStat], grace_s: float
) -> tuple[list[str], int, list[str]]:
    """Delete the blobs of ``batch`` that are still unreferenced and unclaimed, file and row, in one
    write transaction; returns (removed, bytes freed, kept because claimed since the scan)."""
    gone: list[str] = []
    claimed: list[str] = []
    freed = 0
    with ctx.catalog.write() as s:  # references are current here, and no writer records meanwhile
        still = cat_maint.referenced_among(s, batch)
        for sha in batch:
            if sha in still:
                continue
            st = stats.get(sha)
            if st is None or ctx.blobs.delete(sha, unless_claimed_within_s=grace_s):
                gone.append(sha)
                freed += 0 if st is None else st.size
            elif ctx.blobs.stat(sha) is not None:
                claimed.append(sha)
            else:
                gone.append(sha)  # another gc got there first
        cat_maint.delete_blob_rows(s, gone)
    return gone, freed, claimed
