"""Use cases on experts and base models: register, import, query, export, remove, rename, tag."""

from __future__ import annotations

import datetime as dt
import functools
import gc
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from libstore.catalog import reads, repo
from libstore.catalog import tags as tags_repo
from libstore.catalog.engine import Transaction
from libstore.errors import (
    AlreadyExistsError,
    BaseModelMismatchError,
    IntegrityError,
    LibstoreError,
    NotFoundError,
    QueryError,
    ValidationError,
)
from libstore.ops.context import Context
from libstore.ops.query import format_query, parse_listing, parse_query
from libstore.store import expert_data
from libstore.store.adapter import check_against_base, read_adapter, validate_name
from libstore.store.blobs import sha256_file
from libstore.store.strict_json import check_json_value
from libstore.types import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    EXPERT_KINDS,
    AdapterFile,
    BaseModel,
    Expert,
    ExpertData,
    ExpertQuery,
    ExpertSort,
    ExpertSummary,
    StoredFile,
    parse_cluster_ref,
)

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class ImportReport:
    """What ``import_dir`` did: experts added, folders skipped because already present.

    ``not_imported``: (name, why) of what an import found but does not store by design, e.g. the
    experts of an mttl library that use another adapter type than LoRA."""

    added: tuple[Expert, ...] = ()
    skipped: tuple[str, ...] = ()
    failed: tuple[tuple[str, str], ...] = field(default=())
    not_imported: tuple[tuple[str, str], ...] = field(default=())


# --- base models -------------------------------------------------------------------------------


def add_base(ctx: Context, name: str, source: str, revision: str | None = None) -> BaseModel:
    from libstore.store.basemodel import inspect_base_model

    validate_name(name)
    base = inspect_base_model(source, name=name, revision=revision)
    with ctx.catalog.write() as s:
        repo.add_base(s, base)
    return base


def bases(ctx: Context) -> list[BaseModel]:
    with ctx.catalog.read() as s:
        return repo.list_bases(s)


def get_base(ctx: Context, name: str) -> BaseModel:
    with ctx.catalog.read() as s:
        return repo.get_base(s, name)


def remove_base(ctx: Context, name: str) -> None:
    """Unregister a base model; :class:`InUseError` while experts of it remain."""
    with ctx.catalog.write() as s:
        repo.remove_base(s, name)


# --- adding experts ----------------------------------------------------------------------------


def add(
    ctx: Context,
    folder: str | os.PathLike[str],
    *,
    name: str | None = None,
    kind: str = "task",
    base: str | None = None,
    tasks: Iterable[str] = (),
    tags: Iterable[str] = (),
    metadata: dict[str, Any] | None = None,
    cluster: str | None = None,
    source: str | None = None,
    allow_base_mismatch: bool = False,
    allow_nonfinite: bool = False,
) -> Expert:
    """Validate a PEFT folder, store its files as blobs and record it, all or nothing."""
    folder = Path(folder)
    name = validate_name(name if name is not None else folder.name)
    _check_kind(kind)
    tasks = [validate_name(t) for t in tasks]
    tags = [validate_name(t) for t in tags]
    check_json_value(metadata, "metadata")
    adapter = read_adapter(folder, into=ctx.blobs, allow_nonfinite=allow_nonfinite)
    try:
        return _add_adapter(
            ctx,
            adapter,
            name=name,
            kind=kind,
            base=base,
            tasks=tasks,
            tags=tags,
            metadata=metadata,
            cluster=cluster,
            source=source or str(folder.resolve()),
            allow_base_mismatch=allow_base_mismatch,
        )
    except BaseModelMismatchError as e:
        raise _naming_module_types(ctx, e, adapter, base) from None


def _add_adapter(ctx: Context, adapter: AdapterFile, **kw: Any) -> Expert:
    with ctx.blobs.discarding([adapter.weights]), ctx.catalog.write() as s:
        return insert_adapter(ctx, s, adapter, **kw)


def _naming_module_types(
    ctx: Context, error: BaseModelMismatchError, adapter: AdapterFile, base: str | None
) -> BaseModelMismatchError:
    """``error`` with the type of the first adapter module the base has but cannot adapt."""
    from libstore.store.basemodel import module_types

    with ctx.catalog.read() as s:
        base_model = repo.resolve_base(s, base)
    missing = [m for m in adapter.modules if m not in base_model.linear_shapes]
    types = module_types(base_model, missing) if missing else {}
    if not types:
        return error
    module, kind = next(iter(types.items()))
    return BaseModelMismatchError(
        f"{error.message} Module {module!r} of base model {base_model.name!r} is a {kind}: LoRA on "
        f"that layer type is not supported (libstore adapts nn.Linear and transformers Conv1D)"
    )


def insert_adapter(
    ctx: Context,
    s: Transaction,
    adapter: AdapterFile,
    *,
    name: str,
    kind: str,
    base: str | None,
    tasks: Sequence[str],
    tags: Sequence[str],
    metadata: dict[str, Any] | None,
    cluster: str | None,
    source: str | None,
    allow_base_mismatch: bool,
    data_files: Sequence[StoredFile] = (),
) -> Expert:
    """Store a validated adapter's blobs and record it inside the caller's transaction ``s``.

    Imports that must be all or nothing across many adapters (import-dir, import-mttl) call this
    once per adapter within one transaction. ``data_files``: the files of the data attached to it,
    already stored as blobs (before the transaction, which stays short): recorded as more of its
    files once they are claimed.
    """
    base_model = repo.resolve_base(s, base)
    check_against_base(adapter, base_model, allow_base_mismatch=allow_base_mismatch)
    if repo.expert_exists(s, name):
        raise AlreadyExistsError(
            f"an expert named {name!r} already exists; choose another --name, or remove it first",
            what="expert",
            name=name,
        )
    cluster_tasks = _cluster_tasks(s, cluster, kind)
    files = store_adapter_files(ctx, adapter)
    ctx.blobs.claim_all(f.sha256 for f in data_files)  # stored before: gc may have run
    files += data_files
    return repo.add_expert(
        s,
        expert_record(
            adapter,
            files,
            name=name,
            kind=kind,
            base_model=base_model.name,
            source=source,
            tasks=[*tasks, *cluster_tasks],
            tags=tags,
            cluster=cluster,
            metadata=metadata,
        ),
    )


def expert_record(
    adapter: AdapterFile,
    files: Sequence[StoredFile],
    *,
    name: str,
    kind: str,
    base_model: str,
    source: str | None,
    tasks: Iterable[str] = (),
    tags: Iterable[str] = (),
    cluster: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    created_at: dt.datetime | None = None,
) -> Expert:
    """The catalog record of a validated adapter whose ``files`` are stored (the one place that maps
    an adapter's LoRA config onto an :class:`Expert`)."""
    return Expert(
        name=name,
        kind=kind,
        base_model=base_model,
        rank=adapter.rank,
        alpha=adapter.alpha,
        use_rslora=adapter.use_rslora,
        target_modules=adapter.target_modules,
        modules=dict(adapter.modules),
        dtype=adapter.dtype,
        sha256=next(f for f in files if f.path == ADAPTER_WEIGHTS).sha256,
        bytes=sum(f.size for f in files),
        files=tuple(files),
        source=source,
        tasks=tuple(dict.fromkeys(tasks)),
        tags=tuple(dict.fromkeys(tags)),
        cluster=cluster,
        metadata=dict(metadata or {}),
        created_at=created_at,
    )


def store_adapter_files(ctx: Context, adapter: AdapterFile) -> list[StoredFile]:
    """Put the adapter's config and its staged weights into the blob store (deduplicated)."""
    cfg = ctx.blobs.put_bytes(adapter.config_bytes)
    weights = ctx.blobs.commit_staged(adapter.weights)
    return [
        StoredFile(ADAPTER_CONFIG, cfg.sha256, cfg.size),
        StoredFile(ADAPTER_WEIGHTS, weights.sha256, weights.size),
    ]


def _cluster_tasks(s: Transaction, cluster: str | None, kind: str) -> list[str]:
    """The tasks of cluster ``NAME:INDEX`` (a cluster expert is trained on them); checks the link."""
    if cluster is None:
        return []
    if kind != "cluster":
        raise ValidationError("--cluster links a cluster expert: use it with --kind cluster", field="cluster")
    try:
        clustering_name, index = parse_cluster_ref(cluster)
    except QueryError as e:
        raise ValidationError(e.message, field="cluster") from None
    if index is None:
        raise ValidationError(
            f"--cluster takes CLUSTERING:INDEX (e.g. mbc-k10:3), got {cluster!r}", field="cluster"
        )
    return list(repo.cluster_tasks(s, clustering_name, index))


def _check_kind(kind: str) -> None:
    if kind not in EXPERT_KINDS:
        raise ValidationError(f"unknown kind {kind!r}; kinds are {', '.join(EXPERT_KINDS)}", field="kind")


def find_adapter_folders(root: Path) -> list[Path]:
    """Every folder at or below ``root`` holding an ``adapter_config.json``, sorted."""
    return sorted(p.parent for p in Path(root).rglob(ADAPTER_CONFIG))


def _gc_frozen(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with the objects alive at its start frozen out of the cyclic GC (``gc.freeze``).

    A bulk import allocates enough to trigger full collections, and each one walks every object of
    the process again: in a process with a large heap (the API inside an application) that was a
    fifth of the time of 2,000 adapters; a fresh CLI process has few objects to walk and gains
    little. Unfrozen on the way out; left alone where the host process froze objects itself.
    """

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        if gc.get_freeze_count():
            return fn(*args, **kwargs)
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()

    return run


@_gc_frozen
def import_dir(
    ctx: Context,
    root: str | os.PathLike[str],
    *,
    kind: str = "task",
    base: str | None = None,
    tags: Iterable[str] = (),
    task_from_name: bool = False,
    allow_base_mismatch: bool = False,
    allow_nonfinite: bool = False,
) -> ImportReport:
    """Import every PEFT folder below ``root`` (names from folder names) in one transaction.

    Every adapter is validated before anything is written; one bad folder fails the whole import and
    leaves the library unchanged. A folder whose name and weights are already in the library is
    skipped, so re-running an import is harmless: its weights are hashed in place and nothing is
    copied. Folders are read (hashed and copied in one pass, validated) in parallel threads; the
    copies are then fsynced together (concurrent fsyncs share the file system's journal commits),
    before the write lock is taken; the experts go in with bulk inserts in the one transaction.
    """
    _check_kind(kind)
    tags = [validate_name(t) for t in tags]
    folders = find_adapter_folders(Path(root))
    if not folders:
        raise ValidationError(f"no PEFT adapter folders (with {ADAPTER_CONFIG}) below {root}", path=str(root))
    names = [validate_name(f.name) for f in folders]
    dupes = sorted(n for n, k in Counter(names).items() if k > 1)  # not names.count: n² at 10k
    if dupes:
        raise ValidationError(
            f"several folders below {root} are named {dupes[0]!r}; expert names must be unique — "
            f"import them one by one with libstore add --name",
            path=str(root),
        )
    with ctx.catalog.read() as s:
        recorded = repo.expert_sha256s(s, names)
    adapters: list[tuple[str, AdapterFile]] = []
    skipped: list[str] = []
    with ctx.blobs.discarding(a.weights for _, a in adapters):  # read on exit: all staged so far
        for name, adapter in _read_folders(ctx, names, folders, recorded, allow_nonfinite):
            if adapter is None:
                skipped.append(name)
            else:
                adapters.append((name, adapter))
        durable = ctx.blobs.make_durable([a.weights for _, a in adapters])  # outside the write lock
        adapters[:] = [(n, replace(a, weights=w)) for (n, a), w in zip(adapters, durable, strict=True)]
        with ctx.catalog.write() as s:
            if repo.expert_sha256s(s, skipped) != {n: recorded[n] for n in skipped}:
                raise LibstoreError(
                    "experts being imported were changed meanwhile; nothing was changed — run again"
                )
            base_model = repo.resolve_base(s, base)
            for _, adapter in adapters:
                try:
                    check_against_base(adapter, base_model, allow_base_mismatch=allow_base_mismatch)
                except LibstoreError as e:
                    raise e.add_context(adapter.folder) from None
            stored = _store_files(ctx, [a for _, a in adapters])
            now = dt.datetime.now(dt.UTC)
            added = [
                expert_record(
                    a,
                    files,
                    name=name,
                    kind=kind,
                    base_model=base_model.name,
                    source=str(Path(a.folder).resolve()),
                    tasks=(name,) if task_from_name else (),
                    tags=tags,
                    created_at=now,
                )
                for (name, a), files in zip(adapters, stored, strict=True)
            ]
            repo.add_experts(s, added)
    return ImportReport(added=tuple(added), skipped=tuple(skipped))


def _workers() -> int:
    """Threads for reading adapter folders: one per core. Reading, hashing and copying release the
    GIL, but with the fsyncs batched afterwards the rest is Python: more threads only contend."""
    return min(8, os.cpu_count() or 1)


def _read_folders(
    ctx: Context,
    names: Sequence[str],
    folders: Sequence[Path],
    recorded: dict[str, str],
    allow_nonfinite: bool,
) -> Iterator[tuple[str, AdapterFile | None]]:
    """``(name, validated adapter)`` per folder in order, read in parallel; ``None`` for a folder whose
    weights are already recorded under its name (hashed in place: no copy, no validation). The
    first failure (in folder order) is raised once every folder is done; the caller discards what
    was staged."""

    def read(name: str, folder: Path) -> AdapterFile | None:
        if name in recorded:
            try:
                if sha256_file(folder / ADAPTER_WEIGHTS) == recorded[name]:
                    return None
            except OSError:
                pass  # read_adapter says what is wrong with the folder
        try:  # fsynced together once all are validated (concurrent fsyncs share journal commits)
            return read_adapter(folder, into=ctx.blobs, allow_nonfinite=allow_nonfinite, durable=False)
        except LibstoreError as e:
            raise e.add_context(str(folder)) from None

    with ThreadPoolExecutor(_workers()) as pool:
        futures = [pool.submit(read, n, f) for n, f in zip(names, folders, strict=True)]
        failure: BaseException | None = None
        for name, fut in zip(names, futures, strict=True):
            try:
                result = fut.result()
            except BaseException as e:
                failure = failure or e
                continue
            yield name, result
    if failure is not None:
        raise failure


def _store_files(ctx: Context, adapters: Sequence[AdapterFile]) -> list[list[StoredFile]]:
    """Store the configs and the staged weights of ``adapters``, each as one batch (one fsync per
    shard folder, not per blob)."""
    configs = ctx.blobs.put_bytes_many([a.config_bytes for a in adapters])
    weights = ctx.blobs.commit_staged_many([a.weights for a in adapters])
    return [
        [StoredFile(ADAPTER_CONFIG, c.sha256, c.size), StoredFile(ADAPTER_WEIGHTS, w.sha256, w.size)]
        for c, w in zip(configs, weights, strict=True)
    ]


# --- reading -----------------------------------------------------------------------------------


def experts(
    ctx: Context,
    query: str | ExpertQuery | None = None,
    *,
    sort: ExpertSort = "name",
    descending: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> list[Expert]:
    """The experts a query matches, ordered by ``sort`` then name, the page ``offset``/``limit`` of
    them (one snapshot, a constant number of statements)."""
    q = parse_listing(query, sort, limit, offset)
    with ctx.catalog.read() as s:
        db = reads.of_session(s)
        return reads.list_experts(db, q, sort=sort, descending=descending, limit=limit, offset=offset)


def summaries(
    ctx: Context,
    query: str | ExpertQuery | None = None,
    *,
    sort: ExpertSort = "name",
    descending: bool = False,
    limit: int | None = None,
    offset: int = 0,
) -> list[ExpertSummary]:
    """As :func:`experts`, without module shapes, files, metadata or parents: what a listing shows."""
    q = parse_listing(query, sort, limit, offset)
    with ctx.catalog.read() as s:
        db = reads.of_session(s)
        return reads.list_summaries(db, q, sort=sort, descending=descending, limit=limit, offset=offset)


def get(ctx: Context, name: str) -> Expert:
    with ctx.catalog.read() as s:
        return repo.get_expert(s, name)


def export(ctx: Context, name: str, dest: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the expert as a PEFT folder (``PeftModel.from_pretrained`` loads it), hash-checked."""
    expert = get(ctx, name)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise AlreadyExistsError(
            f"{dest} exists and is not empty; pass --overwrite or another path", what="file", name=str(dest)
        )
    dest.mkdir(parents=True, exist_ok=True)
    for f in expert.files:
        (dest / f.path).parent.mkdir(parents=True, exist_ok=True)
        copy_blob(ctx, f, dest / f.path)
    return dest


def data(ctx: Context, name: str, data_type: str) -> ExpertData:
    """The data of type ``data_type`` attached to expert ``name`` (an mttl import's auxiliary data),
    read back from its files, hash-checked; :class:`NotFoundError` names the types it has."""
    expert = get(ctx, name)
    meta, tensors = expert_data.data_files(expert.files, data_type)
    if meta is None:
        have = ", ".join(expert.data_types) or "none"
        raise NotFoundError(
            f"expert {name!r} has no attached data of type {data_type!r} (it has: {have})",
            what="expert data",
            name=f"{name}:{data_type}",
        )
    ctx.blobs.fetch([f.sha256 for f in (meta, tensors) if f is not None])
    for f in (meta, tensors):
        if f is not None and sha256_file(ctx.blobs.path(f.sha256)) != f.sha256:
            raise IntegrityError(
                f"blob {f.sha256} of {f.path} is corrupt in the store; run: libstore verify",
                sha256=f.sha256,
                path=f.path,
            )
    return expert_data.decode(
        data_type,
        ctx.blobs.read_bytes(meta.sha256),
        None if tensors is None else ctx.blobs.path(tensors.sha256),
        where=f"expert {name!r}",
    )


def copy_blob(ctx: Context, f: StoredFile, target: Path) -> None:
    """Copy a blob to ``target`` atomically, checking its hash on the way out."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with ctx.blobs.open(f.sha256) as src, open(tmp, "wb") as out:  # a missing blob: NotFoundError
            shutil.copyfileobj(src, out, 1 << 20)
        if sha256_file(tmp) != f.sha256:
            raise IntegrityError(
                f"blob {f.sha256} of {f.path} is corrupt in the store; run: libstore verify",
                sha256=f.sha256,
                path=f.path,
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --- changing ----------------------------------------------------------------------------------


def remove(ctx: Context, name: str) -> None:
    """Remove the record; blobs stay until ``libstore gc`` (another expert may share them)."""
    with ctx.catalog.write() as s:
        repo.delete_expert(s, name)


def rename(ctx: Context, old: str, new: str) -> Expert:
    validate_name(new)
    with ctx.catalog.write() as s:
        return repo.rename_expert(s, old, new)


def tag(ctx: Context, query: str | ExpertQuery, tags: Iterable[str]) -> list[str]:
    """Add tags to every expert the query matches; returns the names matched."""
    tags = [validate_name(t) for t in tags]
    q = parse_query(query)
    with ctx.catalog.write() as s:
        names = _names_or_error(s, q, query)
        tags_repo.add_tags(s, q, tags)
        return names


def untag(ctx: Context, query: str | ExpertQuery, tags: Iterable[str]) -> list[str]:
    """Remove tags from every expert the query matches; returns the names matched."""
    q = parse_query(query)
    with ctx.catalog.write() as s:
        names = _names_or_error(s, q, query)
        tags_repo.remove_tags(s, q, list(tags))
        return names


def _names_or_error(s: Transaction, q: ExpertQuery, query: str | ExpertQuery) -> list[str]:
    names = repo.expert_names(s, q)
    if not names:
        text = query if isinstance(query, str) else format_query(query)
        raise NotFoundError(
            f"no expert matches {text!r}; list them with: libstore ls", what="expert", name=text
        )
    return names


def tags(ctx: Context) -> list[tuple[str, int]]:
    with ctx.catalog.read() as s:
        return tags_repo.list_tags(s)
