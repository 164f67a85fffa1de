"""Maintenance: ``verify`` (is the library sound?) and ``gc`` (reclaim what nothing references).

**verify** checks, without torch:

* every blob a row references exists, hashes to its name and has a ``blobs`` row of the right size;
  every file in the store is a blob, a temp file or reported as stray; every ``blobs`` row has a file;
* every expert's stored weights agree with its record: the safetensors header's LoRA modules, shapes,
  rank and dtype, the config blob's ``r``/``lora_alpha``/``use_rslora``, the weights hash and byte
  count, and the base model's Linear shapes;
* every foreign key of the catalog points at an existing row (derivation parents, clusterings,
  expert files, prototype caches, sync records...), found generically from the schema;
* every prototype cache entry's blob is a ``libstore-prototypes`` file made for that expert hash.

Problems are typed dataclasses (:class:`Problem` subclasses) with a severity: an *error* makes
``verify`` fail; a *warning* is something normal after a crash or during concurrent writes (temp
files, blobs stored by an import that has not committed yet, orphaned caches) that ``gc`` collects.

``repair=True`` fixes only what is safe to fix: it re-records missing ``blobs`` rows for files that
hash right and corrects their sizes, drops prototype cache rows whose blob is missing, corrupt or not
a prototype file (they are recomputed on demand), drops rows that point at rows that are gone the way
the schema's ``ON DELETE`` would have (``SET NULL``/``CASCADE``), moves corrupt blob files to
``<library>/quarantine/`` (so that re-adding or pulling the expert can store the right bytes again;
nothing is deleted) and removes temp files older than the grace period. It never deletes an expert.

**gc** removes unreferenced blobs (file and row), prototype caches of experts that no longer exist,
and stale temp files. It is safe against concurrent writers:

* An import (add, gks, prototypes, pull) writes its blobs *before* the catalog transaction that
  references them commits. ``gc`` therefore never deletes an unreferenced blob *claimed* within the
  grace period (default :data:`DEFAULT_GRACE_S`, one hour): a blob is claimed when it is written
  (its mtime) or when a writer finds it already stored and re-uses it (the blob store then sets its
  atime; reads may also set atime, which only makes gc keep a blob longer). The grace period must
  exceed the longest time an operation stages blobs before committing (a very long pull); ``grace 0``
  is for a library nobody else writes to.
* Deletion itself cannot race with such a re-use: the row is deleted in a write transaction that
  re-checks references (writers are serialised), then the file is renamed to a tombstone
  (``.gc-<digest>-<random>`` in its shard) and its timestamps are read again: if a writer claimed it
  in between, it is put back; a writer that comes after the rename finds no blob and writes a new one.
  A tombstone left by a crash is put back if it is young, deleted if it is old.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import Table, delete, select, update
from sqlalchemy.orm import Session

from libstore.catalog import prototypes as cache
from libstore.catalog import repo
from libstore.catalog.models import (
    Base,
    BlobRow,
    ExpertFileRow,
    ExpertRow,
    PrototypeCacheRow,
)
from libstore.errors import ValidationError
from libstore.ops.context import Context
from libstore.ops.prototypes import PROTOTYPE_FORMAT
from libstore.ops.sync import TMP_DIR as ROOT_TEMP_DIR
from libstore.store.adapter import KEY_PREFIX
from libstore.store.blobs import ALGORITHM, CHUNK, TEMP_PREFIX, fsync_dir
from libstore.store.safetensors_io import FLOAT_DTYPE_NAMES, read_header
from libstore.store.strict_json import strict_loads
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS

#: Default grace period: unreferenced blobs and temp files younger than this are kept.
DEFAULT_GRACE_S = 3600.0
QUARANTINE_DIR = "quarantine"
TOMB_PREFIX = ".gc-"
#: Temp entries operations leave in the library folder while they run (and after a crash):
#: ``ops.tensors.stage_expert`` and ``ops.prototypes._store_blob`` (with ``save_tensors``' own temp
#: name), plus one folder per sync / Hub import run inside ``ROOT_TEMP_DIR``.
ROOT_TEMP_PREFIXES = (".derive-", ".prototypes-", "..prototypes-")
HASH_WORKERS = 4

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX2 = re.compile(r"[0-9a-f]{2}")
_LORA_KEY = re.compile(
    rf"{re.escape(KEY_PREFIX)}(?P<module>[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*)\.lora_(?P<part>[AB])\.weight"
)


# --- problems ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Something ``verify`` found. ``code`` names the kind; errors make verify fail."""

    code: ClassVar[str] = "problem"
    severity: ClassVar[str] = "error"

    @property
    def message(self) -> str:
        return self.code

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "severity": self.severity, "message": self.message}
        out.update({k: v for k, v in self.__dict__.items()})
        return out


def _refs(referenced_by: tuple[str, ...]) -> str:
    shown = ", ".join(referenced_by[:3])
    return shown + (f" and {len(referenced_by) - 3} more" if len(referenced_by) > 3 else "")


@dataclass(frozen=True)
class MissingBlob(Problem):
    """A blob some row references is not in the store."""

    code: ClassVar[str] = "missing_blob"
    sha256: str
    referenced_by: tuple[str, ...]

    @property
    def message(self) -> str:
        return (
            f"blob {self.sha256} is missing from the store but {_refs(self.referenced_by)} "
            f"needs it; re-add or pull that expert (prototype caches are recomputed)"
        )


@dataclass(frozen=True)
class CorruptBlob(Problem):
    """A blob whose bytes no longer hash to its name."""

    code: ClassVar[str] = "corrupt_blob"
    sha256: str
    actual_sha256: str
    size: int
    referenced_by: tuple[str, ...]

    @property
    def severity(self) -> str:  # type: ignore[override]
        return "error" if self.referenced_by else "warning"

    @property
    def message(self) -> str:
        who = f"used by {_refs(self.referenced_by)}" if self.referenced_by else "unreferenced"
        return f"blob {self.sha256} is corrupt: its {self.size} bytes hash to {self.actual_sha256} ({who})"


@dataclass(frozen=True)
class UnrecordedBlob(Problem):
    """A referenced blob with no ``blobs`` row (foreign keys were off, or the row was deleted)."""

    code: ClassVar[str] = "unrecorded_blob"
    sha256: str
    referenced_by: tuple[str, ...]

    @property
    def message(self) -> str:
        return f"blob {self.sha256} is used by {_refs(self.referenced_by)} but has no blobs row"


@dataclass(frozen=True)
class BlobSizeMismatch(Problem):
    """A ``blobs`` row whose size differs from the file (whose hash is right)."""

    code: ClassVar[str] = "blob_size_mismatch"
    sha256: str
    recorded: int
    actual: int

    @property
    def message(self) -> str:
        return f"blob {self.sha256}: the catalog records {self.recorded} bytes, the file has {self.actual}"


@dataclass(frozen=True)
class BlobRowWithoutFile(Problem):
    """An unreferenced ``blobs`` row whose file is gone (harmless; gc removes it)."""

    code: ClassVar[str] = "blob_row_without_file"
    severity: ClassVar[str] = "warning"
    sha256: str

    @property
    def message(self) -> str:
        return f"blob {self.sha256} is recorded but has no file (nothing uses it)"


@dataclass(frozen=True)
class UntrackedBlob(Problem):
    """A blob file no row records: an import not committed yet, or a leftover of a crash (gc)."""

    code: ClassVar[str] = "untracked_blob"
    severity: ClassVar[str] = "warning"
    sha256: str
    size: int
    age_s: float

    @property
    def message(self) -> str:
        return (
            f"blob {self.sha256} ({self.size} bytes, {self.age_s:.0f} s old) is not recorded; "
            f"an import in flight or a leftover of a crash — gc removes it after the grace period"
        )


@dataclass(frozen=True)
class StrayFile(Problem):
    """A file in the blob store that is neither a blob nor a temp file (not touched)."""

    code: ClassVar[str] = "stray_file"
    severity: ClassVar[str] = "warning"
    path: str

    @property
    def message(self) -> str:
        return f"{self.path} does not belong in the blob store (left alone; move it away)"


@dataclass(frozen=True)
class TempLeftover(Problem):
    """A temp file or folder of a write in flight or of a crashed one."""

    code: ClassVar[str] = "temp_leftover"
    severity: ClassVar[str] = "warning"
    path: str
    age_s: float

    @property
    def message(self) -> str:
        return f"temp {self.path} ({self.age_s:.0f} s old): a write in flight or a crash leftover"


@dataclass(frozen=True)
class ExpertMismatch(Problem):
    """An expert whose stored files disagree with its catalog record."""

    code: ClassVar[str] = "expert_mismatch"
    expert: str
    what: str
    recorded: str
    found: str

    @property
    def message(self) -> str:
        return (
            f"expert {self.expert!r}: {self.what} is recorded as {self.recorded} but the stored "
            f"files say {self.found}"
        )


@dataclass(frozen=True)
class DanglingReference(Problem):
    """A row whose foreign key points at a row that does not exist.

    ``key`` is the row's primary key as (column, value) pairs; ``on_delete`` the schema's rule.
    """

    code: ClassVar[str] = "dangling_reference"
    table: str
    column: str
    value: Any
    target: str
    key: tuple[tuple[str, Any], ...]
    on_delete: str | None

    @property
    def message(self) -> str:
        row = ", ".join(f"{k}={v}" for k, v in self.key)
        return f"{self.table} row ({row}): {self.column}={self.value} points at no {self.target} row"


@dataclass(frozen=True)
class BadPrototypeCache(Problem):
    """A prototype cache entry whose blob is not a prototype file for its expert hash."""

    code: ClassVar[str] = "bad_prototype_cache"
    expert_sha256: str
    method: str
    blob_sha256: str
    reason: str

    @property
    def message(self) -> str:
        return (
            f"prototype cache {self.method} of weights {self.expert_sha256[:12]} (blob "
            f"{self.blob_sha256[:12]}): {self.reason}; repair drops it so it is recomputed"
        )


@dataclass(frozen=True)
class OrphanedPrototypeCache(Problem):
    """A prototype cache of weights no expert has any more (gc removes it)."""

    code: ClassVar[str] = "orphaned_prototype_cache"
    severity: ClassVar[str] = "warning"
    expert_sha256: str
    method: str
    blob_sha256: str

    @property
    def message(self) -> str:
        return (
            f"prototype cache {self.method} of weights {self.expert_sha256[:12]}: no expert has "
            f"these weights any more (gc removes it)"
        )


@dataclass(frozen=True)
class Repair:
    """What ``verify --repair`` did about one problem; ``fixed`` says whether it is gone."""

    problem: Problem
    action: str
    fixed: bool


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify`` found (and, with ``repair``, did).

    Attributes:
        problems: everything found, errors and warnings.
        repairs: what repair did, per problem it acted on.
        experts, blobs, bytes_hashed: how much was checked.
    """

    problems: tuple[Problem, ...]
    repairs: tuple[Repair, ...] = ()
    experts: int = 0
    blobs: int = 0
    bytes_hashed: int = 0

    @property
    def errors(self) -> tuple[Problem, ...]:
        fixed = {id(r.problem) for r in self.repairs if r.fixed}
        return tuple(p for p in self.problems if p.severity == "error" and id(p) not in fixed)

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    @property
    def ok(self) -> bool:
        """No error is left (warnings do not count)."""
        return not self.errors


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
    caches: tuple[cache.CacheEntry, ...] = ()
    temp: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


# --- the store on disk ---------------------------------------------------------------------------


@dataclass
class _Scan:
    blobs: dict[str, os.stat_result] = field(default_factory=dict)
    temps: list[Path] = field(default_factory=list)
    tombs: list[Path] = field(default_factory=list)
    stray: list[Path] = field(default_factory=list)


def _scan_store(ctx: Context) -> _Scan:
    """Classify every entry of ``blobs/sha256/``: blobs, temp files, tombstones, stray files."""
    out = _Scan()
    algo = ctx.blobs.root / ALGORITHM
    if not algo.is_dir():
        return out
    for shard in sorted(algo.iterdir()):
        if not (_HEX2.fullmatch(shard.name) and shard.is_dir()):
            out.stray.append(shard)
            continue
        for entry in sorted(shard.iterdir()):
            name = entry.name
            try:
                st = entry.lstat()
            except FileNotFoundError:
                continue  # removed meanwhile (a concurrent gc, a finished write)
            if name.startswith(TEMP_PREFIX):
                out.temps.append(entry)
            elif name.startswith(TOMB_PREFIX):
                out.tombs.append(entry)
            elif _HEX64.fullmatch(name) and name.startswith(shard.name) and stat.S_ISREG(st.st_mode):
                out.blobs[name] = st
            else:
                out.stray.append(entry)
    return out


def _root_temps(ctx: Context) -> list[Path]:
    """Temp entries of running or crashed operations in the library folder."""
    found = [p for p in ctx.path.iterdir() if p.name.startswith(ROOT_TEMP_PREFIXES)]
    tmp = ctx.path / ROOT_TEMP_DIR
    if tmp.is_dir():
        found.extend(tmp.iterdir())
    return sorted(found)


def _newest_mtime(path: Path) -> float:
    """The newest mtime in a file or folder tree (a folder in use has recently changed entries)."""
    try:
        newest = path.lstat().st_mtime
    except FileNotFoundError:
        return math.inf  # gone: treat as young, leave it
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for n in dirs + files:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, os.lstat(os.path.join(root, n)).st_mtime)
    return newest


def _claimed_at(st: os.stat_result) -> float:
    """When a blob was last written or re-used: its mtime, or the atime a re-use sets."""
    return max(st.st_mtime, st.st_atime)


def _rel(ctx: Context, path: Path) -> str:
    try:
        return str(path.relative_to(ctx.path))
    except ValueError:
        return str(path)


def _remove_path(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(OSError):
                os.chmod(path, 0o644)
            path.unlink()
    except FileNotFoundError:
        return False
    return True


def _hash(path: Path) -> str:
    """sha256 of a file, read without touching its atime where the OS allows (gc reads atime)."""
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:  # O_NOATIME needs ownership
        fd = os.open(path, flags)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


# --- verify --------------------------------------------------------------------------------------


@dataclass
class _Catalog:
    """What verify reads from the catalog, in one read transaction."""

    refs: dict[str, list[str]]  # blob sha256 -> who references it
    proto_refs: dict[str, list[tuple[str, str, int, str]]]  # blob -> cache keys
    rows: dict[str, int]  # blobs rows: sha256 -> size
    experts: list[dict[str, Any]]
    caches: list[cache.CacheEntry]
    dangling: list[DanglingReference]


def _read_catalog(s: Session) -> _Catalog:
    refs: dict[str, list[str]] = {}
    experts: list[dict[str, Any]] = []
    for row in s.scalars(select(ExpertRow).order_by(ExpertRow.name)):
        files = {f.path: (f.blob_sha256, f.size) for f in row.files}
        for path, (sha, _size) in files.items():
            refs.setdefault(sha, []).append(f"expert {row.name!r} ({path})")
        experts.append(
            {
                "name": row.name,
                "rank": row.rank,
                "alpha": row.alpha,
                "use_rslora": row.use_rslora,
                "modules": {k: tuple(v) for k, v in row.module_shapes.items()},
                "dtype": row.dtype,
                "sha256": row.sha256,
                "bytes": row.bytes,
                "files": files,
                "base": row.base_model.name if row.base_model is not None else None,
                "linear": dict(row.base_model.linear_shapes) if row.base_model is not None else {},
            }
        )
    proto_refs: dict[str, list[tuple[str, str, int, str]]] = {}
    for p in s.scalars(select(PrototypeCacheRow)):
        refs.setdefault(p.blob_sha256, []).append(
            f"prototype cache {p.method} of weights {p.expert_sha256[:12]}"
        )
        proto_refs.setdefault(p.blob_sha256, []).append(
            (p.expert_sha256, p.method, p.method_version, p.params_key)
        )
    rows = {sha: int(size) for sha, size in s.execute(select(BlobRow.sha256, BlobRow.size))}
    return _Catalog(refs, proto_refs, rows, experts, cache.entries(s), _dangling(s))


def _dangling(s: Session) -> list[DanglingReference]:
    """Every single-column foreign key value that points at no row, found from the schema."""
    found: list[DanglingReference] = []
    for table in Base.metadata.sorted_tables:
        for fk in table.foreign_keys:
            col, target = fk.parent, fk.column
            if target.table.name == BlobRow.__tablename__:
                continue  # blob references are checked (and repaired) as unrecorded blobs
            pk = list(table.primary_key.columns)
            stmt = (
                select(*pk, col).where(col.is_not(None)).where(~select(target).where(target == col).exists())
            )
            for r in s.execute(stmt):
                *keys, value = r
                found.append(
                    DanglingReference(
                        table=table.name,
                        column=col.name,
                        value=value,
                        target=f"{target.table.name}.{target.name}",
                        key=tuple((c.name, k) for c, k in zip(pk, keys, strict=True)),
                        on_delete=fk.ondelete.upper() if fk.ondelete else None,
                    )
                )
    return found


def _check_expert(ctx: Context, e: Mapping[str, Any], good: set[str]) -> list[Problem]:
    """An expert's record against its stored config and weights header (blobs known to be good)."""
    name = e["name"]
    out: list[Problem] = []

    def bad(what: str, recorded: Any, found: Any) -> None:
        out.append(ExpertMismatch(name, what, str(recorded)[:200], str(found)[:200]))

    files = e["files"]
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if f not in files]
    if missing:
        bad("files", sorted(files), f"no {', '.join(missing)}")
        return out
    w_sha, _ = files[ADAPTER_WEIGHTS]
    if e["sha256"] != w_sha:
        bad("weights sha256", e["sha256"], w_sha)
    total = sum(size for _sha, size in files.values())
    if e["bytes"] != total:
        bad("bytes", e["bytes"], total)
    for path, (sha, size) in files.items():
        if sha in good:
            actual = ctx.blobs.path(sha).stat().st_size
            if actual != size:
                bad(f"size of {path}", size, actual)
    c_sha, _ = files[ADAPTER_CONFIG]
    if c_sha in good:
        try:
            config: Any = strict_loads(ctx.blobs.path(c_sha).read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            config = f"unreadable ({err})"
        if not isinstance(config, dict):
            bad(
                "adapter_config.json",
                "a JSON object",
                config if isinstance(config, str) else type(config).__name__,
            )
        else:
            if config.get("r") != e["rank"]:
                bad("rank (config r)", e["rank"], config.get("r"))
            alpha = config.get("lora_alpha")
            if not isinstance(alpha, int | float) or float(alpha) != float(e["alpha"]):
                bad("alpha (config lora_alpha)", e["alpha"], alpha)
            if bool(config.get("use_rslora", False)) != bool(e["use_rslora"]):
                bad("use_rslora", e["use_rslora"], config.get("use_rslora", False))
    if w_sha in good:
        out.extend(_check_weights(ctx, e, w_sha))
    return out


def _check_weights(ctx: Context, e: Mapping[str, Any], sha: str) -> list[Problem]:
    name = e["name"]
    out: list[Problem] = []

    def bad(what: str, recorded: Any, found: Any) -> None:
        out.append(ExpertMismatch(name, what, str(recorded)[:200], str(found)[:200]))

    try:
        header = read_header(ctx.blobs.path(sha))
    except Exception as err:
        bad("weights", "a valid safetensors file", f"unreadable ({err})")
        return out
    parts: dict[str, dict[str, tuple[int, ...]]] = {}
    dtypes = set()
    for key, info in header.tensors.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            bad("tensors", "PEFT LoRA weights only", f"tensor {key!r}")
            continue
        parts.setdefault(m["module"], {})[m["part"]] = info.shape
        dtypes.add(info.dtype)
    found: dict[str, tuple[int, int, int] | str] = {}
    for module, ab in parts.items():
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            found[module] = f"A {a} B {b}"
        else:
            found[module] = (a[1], b[0], a[0])
    recorded = e["modules"]
    if set(found) != set(recorded):
        extra = sorted(set(found) - set(recorded))[:3]
        lack = sorted(set(recorded) - set(found))[:3]
        bad("modules", f"{len(recorded)} modules", f"{len(found)} (extra {extra}, missing {lack})")
    for module in sorted(set(found) & set(recorded)):
        if found[module] != tuple(recorded[module]):
            bad(f"shape of {module}", "(in, out, rank) " + str(tuple(recorded[module])), found[module])
    ranks = {v[2] for v in found.values() if isinstance(v, tuple)}
    if ranks and ranks != {e["rank"]}:
        bad("rank", e["rank"], sorted(ranks))
    names = {FLOAT_DTYPE_NAMES.get(d, d) for d in dtypes}
    if names and names != {e["dtype"]}:
        bad("dtype", e["dtype"], sorted(names))
    linear = e["linear"]
    for module, shape in sorted(recorded.items()):
        lin = linear.get(module)
        if lin is None or (lin[0], lin[1]) != (shape[0], shape[1]):
            bad(
                f"base model fit of {module}",
                f"Linear of base {e['base']!r}",
                "absent" if lin is None else f"Linear({lin[0]}, {lin[1]})",
            )
            break
    return out


def _check_prototypes(ctx: Context, entries: Iterable[cache.CacheEntry], good: set[str]) -> list[Problem]:
    out: list[Problem] = []
    for c in entries:
        if c.blob_sha256 not in good:
            continue  # reported as a missing or corrupt blob
        try:
            meta = read_header(ctx.blobs.path(c.blob_sha256)).metadata
        except Exception as err:
            out.append(
                BadPrototypeCache(c.expert_sha256, c.method, c.blob_sha256, f"unreadable ({str(err)[:120]})")
            )
            continue
        if meta.get("format") != PROTOTYPE_FORMAT:
            reason = f"format {meta.get('format')!r}, not {PROTOTYPE_FORMAT!r}"
        elif meta.get("expert_sha256") != c.expert_sha256:
            reason = f"made for weights {str(meta.get('expert_sha256'))[:12]}"
        elif meta.get("method") != c.method:
            reason = f"made by method {meta.get('method')!r}"
        else:
            continue
        out.append(BadPrototypeCache(c.expert_sha256, c.method, c.blob_sha256, reason))
    return out


def verify(
    ctx: Context, *, repair: bool = False, grace_s: float = DEFAULT_GRACE_S, workers: int = HASH_WORKERS
) -> VerifyReport:
    """Check that catalog and blob store agree and every stored byte is what its record says.

    With ``repair`` fix what is safe to fix (see the module docstring); never deletes an expert.
    """
    now = time.time()
    with ctx.catalog.read() as s:
        if s.get_bind().dialect.name == "postgresql":  # one snapshot for every query (SQLite: a
            s.connection(execution_options={"isolation_level": "REPEATABLE READ"})  # read txn is)
        cat = _read_catalog(s)
    scan = _scan_store(ctx)
    problems: list[Problem] = []

    # every blob file and every referenced blob is hashed
    to_hash = sorted(scan.blobs)
    hashes: dict[str, str] = {}
    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, os.cpu_count() or 1))) as pool:
        futures = {pool.submit(_hash, ctx.blobs.path(sha)): sha for sha in to_hash}
        for fut, sha in futures.items():
            with contextlib.suppress(FileNotFoundError):  # removed since the scan: missing below
                hashes[sha] = fut.result()
    good = {sha for sha, h in hashes.items() if h == sha}
    bytes_hashed = sum(scan.blobs[sha].st_size for sha in hashes)

    missing: list[str] = []
    for sha in sorted(set(cat.refs) | set(scan.blobs) | set(cat.rows)):
        referenced = tuple(cat.refs.get(sha, ()))
        if sha in hashes and sha not in good:
            problems.append(CorruptBlob(sha, hashes[sha], scan.blobs[sha].st_size, referenced))
        elif referenced and sha not in hashes:
            missing.append(sha)
        if sha in good:
            size = scan.blobs[sha].st_size
            if sha not in cat.rows:
                if referenced:
                    problems.append(UnrecordedBlob(sha, referenced))
                else:
                    problems.append(UntrackedBlob(sha, size, now - _claimed_at(scan.blobs[sha])))
            elif cat.rows[sha] != size:
                problems.append(BlobSizeMismatch(sha, cat.rows[sha], size))
        if sha in cat.rows and sha not in scan.blobs and not referenced:
            problems.append(BlobRowWithoutFile(sha))
    if missing:  # a concurrent remove + gc may have freed some since the catalog was read
        with ctx.catalog.read() as s:
            still = repo.referenced_blobs(s)
        problems.extend(MissingBlob(sha, tuple(cat.refs[sha])) for sha in missing if sha in still)

    for e in cat.experts:
        problems.extend(_check_expert(ctx, e, good))
    problems.extend(_check_prototypes(ctx, cat.caches, good))
    problems.extend(
        OrphanedPrototypeCache(c.expert_sha256, c.method, c.blob_sha256) for c in cat.caches if not c.experts
    )
    problems.extend(cat.dangling)
    problems.extend(StrayFile(_rel(ctx, p)) for p in scan.stray)
    for p in [*scan.temps, *scan.tombs, *_root_temps(ctx)]:
        problems.append(TempLeftover(_rel(ctx, p), max(0.0, now - _newest_mtime(p))))

    repairs = _repair(ctx, problems, cat, grace_s) if repair else []
    return VerifyReport(
        problems=tuple(problems),
        repairs=tuple(repairs),
        experts=len(cat.experts),
        blobs=len(set(scan.blobs) | set(cat.refs)),
        bytes_hashed=bytes_hashed,
    )


def _repair(ctx: Context, problems: list[Problem], cat: _Catalog, grace_s: float) -> list[Repair]:
    """Fix what is safe: catalog rows in one write transaction, then files."""
    done: list[Repair] = []
    quarantine: list[CorruptBlob] = []
    with ctx.catalog.write() as s:
        tables: dict[str, Table] = {t.name: t for t in Base.metadata.sorted_tables}
        for p in problems:
            if isinstance(p, MissingBlob | CorruptBlob):
                if isinstance(p, CorruptBlob):
                    quarantine.append(p)
                dropped = _drop_caches_of_blob(s, p.sha256)
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
                repo.ensure_blob(s, p.sha256, ctx.blobs.path(p.sha256).stat().st_size)
                done.append(Repair(p, "recorded the blob (its file hashes right)", True))
            elif isinstance(p, BlobSizeMismatch):
                s.execute(update(BlobRow).where(BlobRow.sha256 == p.sha256).values(size=p.actual))
                done.append(Repair(p, f"recorded size {p.actual}", True))
            elif isinstance(p, BlobRowWithoutFile):
                if p.sha256 not in repo.referenced_blobs(s):
                    s.execute(delete(BlobRow).where(BlobRow.sha256 == p.sha256))
                    done.append(Repair(p, "deleted the row", True))
            elif isinstance(p, BadPrototypeCache):
                s.execute(
                    delete(PrototypeCacheRow).where(
                        PrototypeCacheRow.expert_sha256 == p.expert_sha256,
                        PrototypeCacheRow.blob_sha256 == p.blob_sha256,
                        PrototypeCacheRow.method == p.method,
                    )
                )
                done.append(Repair(p, "dropped the cache row (recomputed on demand)", True))
            elif isinstance(p, DanglingReference):
                r = _repair_dangling(s, tables[p.table], p)
                if r is not None:
                    done.append(r)
        s.flush()
    for p in quarantine:
        _quarantine(ctx, p.sha256)
    now = time.time()
    for p in problems:
        if isinstance(p, TempLeftover):
            path = ctx.path / p.path
            if path.name.startswith(TOMB_PREFIX):
                action = _settle_tomb(ctx, path, grace_s, now)
                if action:
                    done.append(Repair(p, action, True))
            elif now - _newest_mtime(path) >= grace_s and _remove_path(path):
                done.append(Repair(p, "removed", True))
    return done


def _drop_caches_of_blob(s: Session, sha: str) -> int:
    rows = list(s.scalars(select(PrototypeCacheRow).where(PrototypeCacheRow.blob_sha256 == sha)))
    for r in rows:
        s.delete(r)
    s.flush()
    return len(rows)


def _repair_dangling(s: Session, table: Table, p: DanglingReference) -> Repair | None:
    col = table.c[p.column]
    cond = [table.c[k] == v for k, v in p.key]
    if p.on_delete == "SET NULL":
        s.execute(update(table).where(*cond, col == p.value).values({col: None}))
        return Repair(p, f"set {p.column} to NULL (as deleting the {p.target} row would have)", True)
    if p.on_delete == "CASCADE":
        s.execute(delete(table).where(*cond))
        return Repair(p, f"deleted the row (as deleting the {p.target} row would have)", True)
    return None


def _quarantine(ctx: Context, sha: str) -> None:
    src = ctx.blobs.path(sha)
    dest_dir = ctx.path / QUARANTINE_DIR
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / f"{sha}.{int(time.time())}-{secrets.token_hex(4)}"
    with contextlib.suppress(FileNotFoundError):
        os.replace(src, dest)
        fsync_dir(src.parent)


# --- gc ------------------------------------------------------------------------------------------


def gc(ctx: Context, *, dry_run: bool = False, grace_s: float = DEFAULT_GRACE_S) -> GcReport:
    """Remove unreferenced blobs (file and row), orphaned prototype caches and stale temp files.

    Blobs and temp files claimed within ``grace_s`` seconds are kept (see the module docstring).
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
        referenced = _live_references(s) if dry_run else repo.referenced_blobs(s)
        rows = {sha: int(size) for sha, size in s.execute(select(BlobRow.sha256, BlobRow.size))}
    scan = _scan_store(ctx)
    candidates: list[str] = []
    kept: list[str] = []
    for sha in sorted((set(rows) | set(scan.blobs)) - referenced):
        st = scan.blobs.get(sha)
        if st is not None and now - _claimed_at(st) < grace_s:
            kept.append(sha)
        else:
            candidates.append(sha)
    removed: list[str] = []
    freed = 0
    if dry_run:
        removed = candidates
        freed = sum(scan.blobs[sha].st_size for sha in candidates if sha in scan.blobs)
    elif candidates:
        with ctx.catalog.write() as s:  # writers are serialised: references are current here
            now_referenced = repo.referenced_blobs(s)
            gone = [sha for sha in candidates if sha not in now_referenced]
            for i in range(0, len(gone), 500):
                s.execute(delete(BlobRow).where(BlobRow.sha256.in_(gone[i : i + 500])))
        for sha in gone:
            size = scan.blobs[sha].st_size if sha in scan.blobs else 0
            if sha not in scan.blobs or _delete_blob_file(ctx, sha, grace_s):
                removed.append(sha)
                freed += size
            else:
                kept.append(sha)

    # 3. temp files and folders of writes that crashed (older than the grace period)
    temp: list[str] = []
    for p in [*scan.temps, *_root_temps(ctx)]:
        if now - _newest_mtime(p) >= grace_s and (dry_run or _remove_path(p)):
            temp.append(_rel(ctx, p))
    for p in scan.tombs:
        if dry_run or _settle_tomb(ctx, p, grace_s, now):
            temp.append(_rel(ctx, p))
    return GcReport(
        dry_run=dry_run,
        grace_s=grace_s,
        blobs=tuple(removed),
        bytes_freed=freed,
        caches=tuple(caches),
        temp=tuple(sorted(temp)),
        kept=tuple(sorted(kept)),
    )


def _live_references(s: Session) -> set[str]:
    """Blobs referenced by expert files and by caches of weights some expert still has (the others
    are orphaned caches, which gc drops first)."""
    files = set(s.scalars(select(ExpertFileRow.blob_sha256)))
    live = select(ExpertRow.sha256)
    protos = set(
        s.scalars(select(PrototypeCacheRow.blob_sha256).where(PrototypeCacheRow.expert_sha256.in_(live)))
    )
    return files | protos


def _delete_blob_file(ctx: Context, sha: str, grace_s: float) -> bool:
    """Delete an unreferenced blob unless a writer claims it meanwhile; True if it was deleted.

    The file is first renamed to a tombstone, so a writer arriving later finds no blob and writes a
    new one; a writer that re-used it just before left a fresh atime, and the tombstone goes back.
    """
    final = ctx.blobs.path(sha)
    tomb = final.with_name(f"{TOMB_PREFIX}{sha}-{secrets.token_hex(4)}")
    try:
        os.rename(final, tomb)
    except FileNotFoundError:
        return True  # already gone (another gc)
    try:
        st = tomb.stat()
    except FileNotFoundError:
        return True  # a concurrent gc settled it
    if time.time() - _claimed_at(st) < grace_s:
        _restore(tomb, final)
        return False
    _remove_path(tomb)
    fsync_dir(final.parent)
    return True


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
                return
    with contextlib.suppress(FileNotFoundError):
        tomb.unlink()
    fsync_dir(final.parent)


def _settle_tomb(ctx: Context, tomb: Path, grace_s: float, now: float) -> str | None:
    """A tombstone left by a crashed gc: put back if claimed within the grace period, else delete."""
    name = tomb.name[len(TOMB_PREFIX) :]
    sha = name.split("-", 1)[0]
    try:
        st = tomb.stat()
    except FileNotFoundError:
        return None
    if _HEX64.fullmatch(sha) and now - _claimed_at(st) < grace_s:
        _restore(tomb, ctx.blobs.path(sha))
        return "put back (claimed within the grace period)"
    _remove_path(tomb)
    return "removed"


def iter_problem_dicts(report: VerifyReport) -> Iterator[dict[str, Any]]:
    """The report's problems as JSON-ready dicts, each with what repair did to it."""
    actions = {id(r.problem): r for r in report.repairs}
    for p in report.problems:
        d = p.as_dict()
        r = actions.get(id(p))
        d["repair"] = None if r is None else {"action": r.action, "fixed": r.fixed}
        yield d
