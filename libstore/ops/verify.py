"""``verify``: do catalog and blob store agree, and is every stored byte what its record says?

It checks:

* every blob a row references exists, hashes to its name and has a ``blobs`` row of the right size;
  every file in the store is a blob, a temp file or reported as stray; every ``blobs`` row has a file;
* every expert's stored files still pass the importer's own validation (``read_adapter``: config,
  safetensors header, LoRA modules) and agree with its record — modules, shapes, rank, dtype,
  ``r``/``lora_alpha``/``use_rslora``, the weights hash and byte count — and the record fits the base
  model's Linear shapes;
* every foreign key of the catalog points at an existing row (derivation parents, clusterings,
  expert files, prototype caches, sync records...), found generically from the schema;
* every prototype cache entry's blob is a ``libstore-prototypes`` file made for that weights hash by
  that method, and holds the prototypes of those weights (:mod:`libstore.ops.verify_prototypes`).

Problems are typed records (:mod:`libstore.ops.problems`). ``repair=True`` fixes only what is safe to
fix: it re-records missing ``blobs`` rows for files that hash right and corrects their sizes, drops
prototype cache rows whose blob is missing, corrupt, not a prototype file or not the prototypes of its
weights (they are recomputed on demand), resolves rows that point at rows that are gone the way the
schema's ``ON DELETE`` would have (``SET NULL``/``CASCADE``), moves corrupt blob files to
``<library>/quarantine/`` (so that re-adding or pulling the expert can store the right bytes again;
nothing is deleted) and removes temp entries older than the grace period. It never deletes an expert.

Torch is imported only when there are prototype caches to recompute.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time
from collections.abc import Mapping
from dataclasses import fields

from libstore.catalog import maintenance as cat_maint
from libstore.catalog.maintenance import CatalogSnapshot
from libstore.errors import LibstoreError, NotFoundError
from libstore.ops.context import Context
from libstore.ops.maintenance import (
    DEFAULT_GRACE_S,
    QUARANTINE_DIR,
    library_leftovers,
    shown,
)
from libstore.ops.problems import (
    BadPrototypeCache,
    BlobRowWithoutFile,
    BlobSizeMismatch,
    CorruptBlob,
    DanglingReference,
    ExpertMismatch,
    MissingBlob,
    OrphanedPrototypeCache,
    Problem,
    Repair,
    StrayFile,
    TempLeftover,
    UnrecordedBlob,
    UntrackedBlob,
    VerifyReport,
)
from libstore.ops.verify_prototypes import check_prototypes
from libstore.store import expert_data
from libstore.store.adapter import read_stored_adapter
from libstore.store.blob_upkeep import StoreScan
from libstore.store.leftovers import Leftover, remove_if_older
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS, BaseModel, Expert

HASH_WORKERS = 4


def verify(
    ctx: Context, *, repair: bool = False, grace_s: float = DEFAULT_GRACE_S, workers: int = HASH_WORKERS
) -> VerifyReport:
    """Check that catalog and blob store agree and every stored byte is what its record says.

    With ``repair`` fix what is safe to fix (see the module docstring); never deletes an expert.
    """
    now = time.time()
    with ctx.catalog.read() as s:
        cat = cat_maint.snapshot(s)
    scan = ctx.blobs.scan()
    in_library = library_leftovers(ctx)
    hashes = _hash_all(ctx, scan, workers)
    good = {sha for sha, h in hashes.items() if h == sha}
    refs = _references(cat)

    problems: list[Problem] = []
    missing: list[str] = []
    for sha in sorted(set(refs) | set(scan.blobs) | set(cat.blob_sizes)):
        referenced = tuple(refs.get(sha, ()))
        blob = scan.blobs.get(sha)
        if sha in hashes and sha not in good:
            problems.append(CorruptBlob(sha, hashes[sha], scan.blobs[sha].size, referenced))
        elif referenced and sha not in hashes:
            missing.append(sha)
        if blob is not None and sha in good:
            if sha not in cat.blob_sizes:
                if referenced:
                    problems.append(UnrecordedBlob(sha, referenced))
                else:
                    problems.append(UntrackedBlob(sha, blob.size, now - blob.claimed_at))
            elif cat.blob_sizes[sha] != blob.size:
                problems.append(BlobSizeMismatch(sha, cat.blob_sizes[sha], blob.size))
        if sha in cat.blob_sizes and blob is None and not referenced:
            problems.append(BlobRowWithoutFile(sha))
    if missing:  # a concurrent remove + gc may have freed some since the catalog was read
        with ctx.catalog.read() as s:
            still = cat_maint.referenced_among(s, missing)
        problems.extend(MissingBlob(sha, tuple(refs[sha])) for sha in missing if sha in still)

    sizes = {sha: b.size for sha, b in scan.blobs.items()}
    for e in cat.experts:
        problems.extend(_check_expert(ctx, e, cat.bases.get(e.base_model), good, sizes))
    problems.extend(check_prototypes(ctx, cat, good))
    problems.extend(
        OrphanedPrototypeCache(c.expert_sha256, c.method, c.blob_sha256) for c in cat.caches if not c.experts
    )
    problems.extend(
        DanglingReference(**{f.name: getattr(d, f.name) for f in fields(d)}) for d in cat.dangling
    )
    problems.extend(StrayFile(shown(ctx, p)) for p in scan.stray)
    leftovers: dict[int, tuple[Leftover, bool]] = {}  # id of the problem -> (it, in the blob store)
    for in_store, found in ((True, scan.leftovers), (False, in_library)):
        for lo in found:
            t = TempLeftover(shown(ctx, lo.location), max(0.0, now - lo.modified_at))
            leftovers[id(t)] = (lo, in_store)
            problems.append(t)

    repairs = _repair(ctx, problems, leftovers, grace_s) if repair else []
    return VerifyReport(
        problems=tuple(problems),
        repairs=tuple(repairs),
        experts=len(cat.experts),
        blobs=len(set(scan.blobs) | set(refs)),
        bytes_hashed=sum(scan.blobs[sha].size for sha in hashes),
    )


def _hash_all(ctx: Context, scan: StoreScan, workers: int) -> dict[str, str]:
    """digest -> what its bytes hash to now, for every blob of the scan (in parallel)."""

    def one(sha: str) -> str | None:
        try:
            return ctx.blobs.digest(sha)
        except NotFoundError:  # removed since the scan: reported as missing if referenced
            return None

    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        found = dict(zip(scan.blobs, pool.map(one, scan.blobs), strict=True))
    return {sha: h for sha, h in found.items() if h is not None}


def _references(cat: CatalogSnapshot) -> dict[str, list[str]]:
    """blob digest -> who references it (for messages)."""
    refs: dict[str, list[str]] = {}
    for e in cat.experts:
        for f in e.files:
            refs.setdefault(f.sha256, []).append(f"expert {e.name!r} ({f.path})")
    for c in cat.caches:
        refs.setdefault(c.blob_sha256, []).append(
            f"prototype cache {c.method} of weights {c.expert_sha256[:12]}"
        )
    return refs


def _check_expert(
    ctx: Context,
    e: Expert,
    base: BaseModel | None,
    good: set[str],
    sizes: Mapping[str, int],
) -> list[Problem]:
    """An expert's record against its stored files (blobs known to be good) and its base model."""
    out: list[Problem] = []

    def bad(what: str, recorded: object, found: object) -> None:
        out.append(ExpertMismatch(e.name, what, str(recorded)[:200], str(found)[:200]))

    files = {f.path: f for f in e.files}
    lacking = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if f not in files]
    if lacking:
        bad("files", sorted(files), f"no {', '.join(lacking)}")
        return out
    weights = files[ADAPTER_WEIGHTS]
    if e.sha256 != weights.sha256:
        bad("weights sha256", e.sha256, weights.sha256)
    total = sum(f.size for f in e.files)
    if e.bytes != total:
        bad("bytes", e.bytes, total)
    for f in e.files:
        if f.sha256 in good and sizes[f.sha256] != f.size:
            bad(f"size of {f.path}", f.size, sizes[f.sha256])
    if base is not None:
        for module, shape in sorted(e.modules.items()):
            lin = base.linear_shapes.get(module)
            if lin is None or (lin.in_features, lin.out_features) != (shape.in_features, shape.out_features):
                found = "absent" if lin is None else f"Linear({lin.in_features}, {lin.out_features})"
                bad(f"base model fit of {module}", f"Linear of base {base.name!r}", found)
                break
    if files[ADAPTER_CONFIG].sha256 in good and weights.sha256 in good:
        out.extend(_check_files(ctx, e))
    if all(f.sha256 in good for f in e.files):
        try:
            expert_data.check_stored(ctx.blobs, e.files, where=f"expert {e.name!r}")
        except (NotFoundError, FileNotFoundError):  # removed since it was hashed: reported as missing
            pass
        except LibstoreError as err:
            bad(
                "attached data",
                "files libstore wrote (mttl/<data_type>.json, .safetensors)",
                f"refused: {err}",
            )
    return out


def _check_files(ctx: Context, e: Expert) -> list[Problem]:
    """The stored config and weights, read the way ``libstore add`` reads an adapter, against the
    record."""
    out: list[Problem] = []

    def bad(what: str, recorded: object, found: object) -> None:
        out.append(ExpertMismatch(e.name, what, str(recorded)[:200], str(found)[:200]))

    try:
        adapter = read_stored_adapter(
            ctx.blobs,
            e.file(ADAPTER_CONFIG).sha256,
            e.file(ADAPTER_WEIGHTS).sha256,
            where=f"expert {e.name!r}",
            allow_nonfinite=True,  # the record says whether NaN/Inf were allowed when it was added
        )
    except (NotFoundError, FileNotFoundError):  # removed since it was hashed: reported as missing
        return out
    except LibstoreError as err:
        bad("files", "a valid PEFT LoRA adapter", f"refused: {err}")
        return out
    if adapter.config.get("r") != e.rank:
        bad("rank (config r)", e.rank, adapter.config.get("r"))
    if adapter.alpha != float(e.alpha):
        bad("alpha (config lora_alpha)", e.alpha, adapter.config.get("lora_alpha"))
    if adapter.use_rslora != bool(e.use_rslora):
        bad("use_rslora", e.use_rslora, adapter.use_rslora)
    found, recorded = adapter.modules, e.modules
    if set(found) != set(recorded):
        extra = sorted(set(found) - set(recorded))[:3]
        lack = sorted(set(recorded) - set(found))[:3]
        bad("modules", f"{len(recorded)} modules", f"{len(found)} (extra {extra}, missing {lack})")
    for module in sorted(set(found) & set(recorded)):
        if found[module] != recorded[module]:
            r, f = recorded[module], found[module]
            bad(
                f"shape of {module}",
                f"(in, out, rank) {(r.in_features, r.out_features, r.rank)}",
                (f.in_features, f.out_features, f.rank),
            )
    ranks = {m.rank for m in found.values()}
    if ranks and ranks != {e.rank}:
        bad("rank", e.rank, sorted(ranks))
    if adapter.dtype != e.dtype:
        bad("dtype", e.dtype, adapter.dtype)
    return out


_NOT_HERE = (
    "nothing: this folder library shares its catalog, so the blob may be in another library's folder; "
    "the shared rows stay (repair where the blob was stored, or move the team to an object store: "
    "libstore blobs migrate --to s3://...)"
)


def _repair(
    ctx: Context, problems: list[Problem], leftovers: Mapping[int, tuple[Leftover, bool]], grace_s: float
) -> list[Repair]:
    """Fix what is safe: catalog rows in one write transaction, then files."""
    done: list[Repair] = []
    quarantine: list[CorruptBlob] = []
    with ctx.catalog.write() as s:
        for p in problems:
            if isinstance(p, MissingBlob) and not ctx.blobs_complete:
                done.append(Repair(p, _NOT_HERE, False))
            elif isinstance(p, MissingBlob | CorruptBlob):
                if isinstance(p, CorruptBlob):
                    quarantine.append(p)
                dropped = cat_maint.drop_caches_of_blob(s, p.sha256)
                only_caches = dropped == len(p.referenced_by) and dropped > 0
                if isinstance(p, MissingBlob) or p.referenced_by:
                    what = f"dropped {dropped} prototype cache row(s)" if dropped else "nothing"
                    if isinstance(p, CorruptBlob):
                        what += f"; moved the file to {QUARANTINE_DIR}/"
                    if not only_caches:
                        what += "; the expert needs its blob again: re-add or pull it"
                    done.append(Repair(p, what, only_caches))
                else:
                    done.append(Repair(p, f"moved the file to {QUARANTINE_DIR}/", True))
            elif isinstance(p, UnrecordedBlob):
                st = ctx.blobs.stat(p.sha256)
                if st is not None:
                    cat_maint.record_blob(s, p.sha256, st.size)
                    done.append(Repair(p, "recorded the blob (its file hashes right)", True))
            elif isinstance(p, BlobSizeMismatch):
                cat_maint.set_blob_size(s, p.sha256, p.actual)
                done.append(Repair(p, f"recorded size {p.actual}", True))
            elif isinstance(p, BlobRowWithoutFile):
                if not cat_maint.referenced_among(s, [p.sha256]):
                    cat_maint.delete_blob_rows(s, [p.sha256])
                    done.append(Repair(p, "deleted the row", True))
            elif isinstance(p, BadPrototypeCache):
                cat_maint.drop_cache(
                    s, expert_sha256=p.expert_sha256, method=p.method, blob_sha256=p.blob_sha256
                )
                done.append(Repair(p, "dropped the cache row (recomputed on demand)", True))
            elif isinstance(p, DanglingReference):
                action = cat_maint.resolve_dangling(s, p)
                if action is not None:
                    done.append(Repair(p, action, True))
    for c in quarantine:
        ctx.blobs.quarantine(c.sha256, ctx.path / QUARANTINE_DIR)
    now = time.time()
    for p in problems:
        if isinstance(p, TempLeftover):
            lo, in_store = leftovers[id(p)]
            action = (
                ctx.blobs.settle(lo, grace_s=grace_s, now=now)
                if in_store
                else ("removed" if remove_if_older(lo, grace_s, now) else None)
            )
            if action:
                done.append(Repair(p, action, True))
    return done
