"""What ``verify`` (:mod:`libstore.ops.verify`) and ``gc`` (:mod:`libstore.ops.gc`) share: the grace
period, where repair puts corrupt blobs, and the temp entries operations leave in the library folder.

**The grace period.** An operation stores its blobs before the catalog transaction that references
them commits (or re-uses blobs already stored). ``gc`` keeps an unreferenced blob claimed within the
grace period — written (mtime) or re-used (``BlobStore.claim`` sets its atime) — and temp entries
changed within it. The operation re-claims its blobs inside the transaction that records them and
gc deletes inside its own write transaction (writers are serialised), so a blob gc took anyway (an
operation that staged for longer than the grace period, or ``gc --grace 0`` beside a writer) makes
the operation fail with ``BlobsRemovedError`` instead of recording a missing blob. ``--grace 0`` is
for a library nobody else writes to: it also removes the temp files of writes in flight.
"""

from __future__ import annotations

from pathlib import Path

from libstore.ops import prototypes, sync_state
from libstore.ops.context import Context
from libstore.store import derived
from libstore.store.leftovers import Leftover, find

#: Default grace period: unreferenced blobs and temp entries younger than this are kept.
DEFAULT_GRACE_S = 3600.0
#: Where ``verify --repair`` moves corrupt blobs (inside the library folder; never deleted).
QUARANTINE_DIR = "quarantine"


def library_leftovers(ctx: Context) -> list[Leftover]:
    """Temp entries of running or crashed operations in the library folder; each module that
    writes one names its own prefix or folder."""
    return find(
        ctx.path,
        prefixes=(derived.TEMP_PREFIX, *prototypes.TEMP_PREFIXES),
        folders=(sync_state.TMP_DIR,),
    )


def shown(ctx: Context, location: str) -> str:
    """A leftover's or file's location as reports show it: relative to the library folder."""
    path = Path(location)
    try:
        return str(path.relative_to(ctx.path))
    except ValueError:
        return location
