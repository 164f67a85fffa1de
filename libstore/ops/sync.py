"""Hub sync: remotes, push, pull and status of whole libraries.

**Push** builds the new manifest from the remote's (at its head) with this library's changed experts
laid over it, uploads only files whose content the remote's head does not already hold (compared by
sha256 for LFS files and git blob id for small ones), and commits everything in one commit on top of
the head it planned against (``parent_commit``). Pushes of more than ``MAX_FILES_PER_COMMIT`` files
go in bounded batches with the manifest (and README) committed last, so a reader never sees a
manifest naming missing files; an interrupted batched push leaves only unreferenced files, and the
next push skips whatever already arrived. If the remote's manifest moved since the last sync, push
refuses (:class:`RemoteMovedError`): pull first. A commit whose answer is lost may still have been
applied, so before retrying the head is checked; if our commit is there, the push succeeded.

**Pull** reads and strictly validates the manifest at a branch, tag or commit, checks that every
file it names exists in that commit with the stated size (and LFS sha256), downloads only blobs the
store lacks (in parallel, each to a unique temp name inside the library), checks each against its
sha256 as it enters the blob store, re-validates each expert's PEFT folder against the manifest's
claims, and then applies everything to the catalog in one transaction. An interrupted pull leaves
the catalog as it was; blobs already stored are not downloaded again by the next pull.

**Status** compares the library, the remote head and the last sync record (see
``libstore.hub.plan``) and says per expert what push and pull would do. Conflicts (an expert
changed on both sides) are reported and never overwritten unless ``force`` is given.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from libstore.catalog import prototypes as proto_repo
from libstore.catalog import remotes as remote_repo
from libstore.catalog import repo
from libstore.catalog.models import BaseModelRow, BlobRow
from libstore.catalog.remotes import ClusterData, ClusteringData, DerivationData, Remote
from libstore.errors import (
    BaseModelMismatchError,
    HubError,
    IntegrityError,
    LibstoreError,
    NotFoundError,
    RemoteMovedError,
    SyncConflictError,
    ValidationError,
)
from libstore.hub import modelcard
from libstore.hub.client import (
    MAX_FILES_PER_COMMIT,
    HubClient,
    RemoteFile,
    check_repo_id,
    git_blob_id,
    is_transient,
)
from libstore.hub.manifest import (
    EXPERT_FILES,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    README_FILE,
    BaseEntry,
    ClusterEntry,
    ClusteringEntry,
    DerivationEntry,
    ExpertEntry,
    FileEntry,
    Manifest,
    PrototypeEntry,
    merge_prototypes,
    parse_manifest,
)
from libstore.hub.plan import (
    ExpertPlan,
    matches,
    plan,
    stale_sync_records,
)
from libstore.ops.context import Context
from libstore.ops.query import parse_query
from libstore.store.adapter import check_against_base, read_adapter, validate_name
from libstore.types import (
    ADAPTER_WEIGHTS,
    BaseModel,
    Expert,
    ExpertQuery,
    LinearShape,
    ModuleShape,
    StoredFile,
)

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
DOWNLOAD_WORKERS = 8
COMMIT_RETRIES = 2


# --- reports -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PushReport:
    """What a push did.

    Attributes:
        remote, repo_id, branch: where it pushed.
        commit: the remote head after the push (``previous_commit`` if nothing was pushed).
        previous_commit: the head the push planned against.
        commits: commits created (more than one for batched pushes).
        files_uploaded, bytes_uploaded: data files sent (the manifest and README included).
        files_deleted: files removed from the repo.
        uploaded, deleted: expert names uploaded / removed on the remote.
        prototypes: prototype files uploaded.
        tag: the tag created, if any.
        experts: per-expert plan (state and action).
    """

    remote: str
    repo_id: str
    branch: str
    commit: str
    previous_commit: str | None
    commits: int
    files_uploaded: int
    bytes_uploaded: int
    files_deleted: int
    uploaded: tuple[str, ...]
    deleted: tuple[str, ...]
    prototypes: int
    tag: str | None
    experts: tuple[ExpertPlan, ...] = ()

    @property
    def changed(self) -> bool:
        return self.commits > 0


@dataclass(frozen=True)
class PullReport:
    """What a pull did.

    Attributes:
        remote, repo_id, revision: where it pulled from; ``commit`` the commit id read.
        files_downloaded, bytes_downloaded: blobs fetched from the remote.
        files_reused: blobs the store already had (not downloaded).
        added, updated, removed: expert names changed in the library.
        conflicts: experts changed on both sides, left alone (pull with ``force`` to take theirs).
        prototypes: prototype cache entries added.
        clusterings: clusterings added; ``clusterings_skipped``: same name locally, different content.
        experts: per-expert plan.
    """

    remote: str
    repo_id: str
    revision: str
    commit: str
    files_downloaded: int
    bytes_downloaded: int
    files_reused: int
    added: tuple[str, ...]
    updated: tuple[str, ...]
    removed: tuple[str, ...]
    conflicts: tuple[str, ...]
    prototypes: int
    clusterings: tuple[str, ...] = ()
    clusterings_skipped: tuple[str, ...] = ()
    experts: tuple[ExpertPlan, ...] = ()


@dataclass(frozen=True)
class StatusReport:
    """Library vs remote head vs last sync, per expert.

    Attributes:
        remote: the remote record.
        head: the commit the remote branch points at (``None``: repo or branch missing).
        remote_moved: the remote's manifest changed since the last sync (push would refuse).
        experts: per expert: state, and what push and pull would do.
    """

    remote: Remote
    head: str | None
    remote_moved: bool
    experts: tuple[ExpertPlan, ...]
    counts: dict[str, int] = field(default_factory=dict)


# --- remotes -------------------------------------------------------------------------------------


def add_remote(ctx: Context, name: str, repo_id: str, *, revision: str = "main", private: bool = False) -> Remote:
    """Record a remote (no network): ``name`` -> Hub model repo ``repo_id`` on branch ``revision``."""
    validate_name(name)
    check_repo_id(repo_id)
    _check_branch(revision)
    with ctx.catalog.write() as s:
        row = remote_repo.add_remote(s, name=name, repo_id=repo_id, revision=revision, private=private)
        return remote_repo.to_remote(s, row)


def remotes(ctx: Context) -> list[Remote]:
    with ctx.catalog.read() as s:
        return remote_repo.list_remotes(s)


def get_remote(ctx: Context, name: str | None = None) -> Remote:
    with ctx.catalog.read() as s:
        return remote_repo.to_remote(s, remote_repo.remote_row(s, _remote_name(s, name)))


def remove_remote(ctx: Context, name: str) -> None:
    """Forget a remote and its sync records (the Hub repo is not touched)."""
    with ctx.catalog.write() as s:
        remote_repo.remove_remote(s, name)


def _check_branch(revision: str) -> None:
    if not revision or any(c.isspace() for c in revision) or ".." in revision or revision.startswith("/"):
        raise ValidationError(f"{revision!r} is not a branch name")


def _remote_name(s: Session, name: str | None) -> str:
    if name is not None:
        return name
    found = remote_repo.only_remote_name(s)
    if found is None:
        raise NotFoundError(
            "no remote given and none is the default (origin, or the only one); add one with: "
            "libstore remote add origin ORG/REPO"
        )
    return found


# --- local state as manifest entries -------------------------------------------------------------


def _expert_entry(e: Expert, d: DerivationData | None) -> ExpertEntry:
    paths = {f.path for f in e.files}
    if paths != set(EXPERT_FILES):
        raise ValidationError(
            f"expert {e.name!r} has files {sorted(paths)}; only PEFT folders of exactly "
            f"{', '.join(EXPERT_FILES)} can be synced"
        )
    return ExpertEntry(
        name=e.name,
        kind=e.kind,
        base_model=e.base_model,
        rank=e.rank,
        alpha=float(e.alpha),
        use_rslora=e.use_rslora,
        target_modules=tuple(e.target_modules),
        modules={m: (s.in_features, s.out_features, s.rank) for m, s in e.modules.items()},
        dtype=e.dtype,
        files={f.path: FileEntry(f.sha256, f.size) for f in e.files},
        tasks=tuple(sorted(e.tasks)),
        tags=tuple(sorted(e.tags)),
        metadata=dict(e.metadata),
        derivation=None if d is None else DerivationEntry(
            method=d.method, method_version=d.method_version, params=dict(d.params),
            inputs_key=d.inputs_key, parents=tuple(d.parents),
        ),
        cluster=e.cluster,
    )


def _base_entry(b: BaseModel) -> BaseEntry:
    return BaseEntry(
        name=b.name, source=b.source, revision=b.revision, architecture=b.architecture,
        model_type=b.model_type, fingerprint=b.fingerprint,
        linear_shapes={m: (s.in_features, s.out_features) for m, s in b.linear_shapes.items()},
    )


def _base_model(b: BaseEntry) -> BaseModel:
    return BaseModel(
        name=b.name, source=b.source, revision=b.revision, architecture=b.architecture,
        model_type=b.model_type, fingerprint=b.fingerprint,
        linear_shapes={m: LinearShape(*s) for m, s in b.linear_shapes.items()},
    )


def _clustering_entry(c: ClusteringData) -> ClusteringEntry:
    return ClusteringEntry(
        name=c.name, base_model=c.base_model, method=c.method, metric=c.metric, k=c.k, seed=c.seed,
        params=dict(c.params), criterion=dict(c.criterion), query=c.query, inputs=tuple(c.inputs),
        clusters=tuple(ClusterEntry(index=k.index, label=k.label, stats=dict(k.stats),
                                    members=tuple(k.members), tasks=tuple(k.tasks)) for k in c.clusters),
    )


def _clustering_data(c: ClusteringEntry) -> ClusteringData:
    return ClusteringData(
        name=c.name, base_model=c.base_model, method=c.method, metric=c.metric, k=c.k, seed=c.seed,
        params=dict(c.params), criterion=dict(c.criterion), query=c.query, inputs=tuple(c.inputs),
        clusters=tuple(ClusterData(index=k.index, label=k.label, stats=dict(k.stats),
                                   members=tuple(k.members), tasks=tuple(k.tasks)) for k in c.clusters),
    )


@dataclass
class _Local:
    experts: dict[str, ExpertEntry]
    bases: dict[str, BaseEntry]
    clusterings: dict[str, ClusteringEntry]
    prototypes: dict[str, list[proto_repo.CacheEntry]]  # expert sha256 -> cache entries
    blob_sizes: dict[str, int]  # prototype blob sha256 -> size

    def digests(self) -> dict[str, str]:
        return {n: e.digest() for n, e in self.experts.items()}


def _local_state(s: Session) -> _Local:
    rows = repo.find_expert_rows(s, ExpertQuery())
    derivs = remote_repo.derivations_of(s, [r.id for r in rows])
    experts = {}
    for row in rows:
        e = repo.to_expert(s, row, with_lineage=False)
        experts[e.name] = _expert_entry(e, derivs.get(row.id))
    protos: dict[str, list[proto_repo.CacheEntry]] = {}
    for p in proto_repo.entries(s):
        protos.setdefault(p.expert_sha256, []).append(p)
    shas = sorted({p.blob_sha256 for ps in protos.values() for p in ps})
    sizes: dict[str, int] = {}
    for i in range(0, len(shas), 500):
        sizes.update((h, n) for h, n in s.execute(select(BlobRow.sha256, BlobRow.size).where(BlobRow.sha256.in_(shas[i:i + 500]))))
    return _Local(
        experts=experts,
        bases={b.name: _base_entry(b) for b in repo.list_bases(s)},
        clusterings={c.name: _clustering_entry(c) for c in remote_repo.clusterings(s)},
        prototypes=protos,
        blob_sizes=sizes,
    )


def _select(query: str | ExpertQuery | None, *sides: Mapping[str, ExpertEntry]) -> set[str] | None:
    """Names matching ``query`` (on the first side that has the expert); ``None``: everything."""
    if query is None or (isinstance(query, str) and not query.strip()):
        return None
    q = parse_query(query)
    names: set[str] = set()
    seen: set[str] = set()
    for side in sides:
        for n, e in side.items():
            if n not in seen:
                seen.add(n)
                if matches(e, q):
                    names.add(n)
    if not names:
        raise NotFoundError(f"no expert matches {query!r} here or on the remote")
    return names


# --- temp folders and remote reading -------------------------------------------------------------


@contextlib.contextmanager
def temp_dir(ctx: Context, kind: str) -> Iterator[Path]:
    """A unique folder inside the library (same filesystem as the blob store), removed afterwards."""
    root = ctx.path / TMP_DIR
    _sweep(root)
    path = root / f"{kind}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _sweep(root: Path, older_than_s: float = 24 * 3600) -> None:
    """Remove temp folders left by crashed runs (age decides: others may be in flight)."""
    if not root.is_dir():
        return
    now = time.time()
    for p in root.iterdir():
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)


@dataclass
class _RemoteView:
    head: str | None
    files: dict[str, RemoteFile]
    manifest: Manifest | None
    manifest_blob: str | None


def _read_remote(client: HubClient, repo_id: str, commit: str | None, tmp: Path) -> _RemoteView:
    if commit is None:
        return _RemoteView(None, {}, None, None)
    files = client.list_files(repo_id, commit)
    mf = files.get(MANIFEST_FILE)
    if mf is None:
        return _RemoteView(commit, files, None, None)
    if mf.size > MAX_MANIFEST_BYTES:
        raise ValidationError(f"{repo_id}@{commit[:12]}: {MANIFEST_FILE} is {mf.size} bytes, over the limit")
    data = client.read_small(repo_id, MANIFEST_FILE, commit, tmp / "manifest", max_bytes=MAX_MANIFEST_BYTES)
    if (mf.sha256 is None and git_blob_id(data) != mf.blob_id) or len(data) != mf.size:
        raise IntegrityError(
            f"{MANIFEST_FILE} of {repo_id}@{commit[:12]} arrived corrupted (its hash differs from the "
            f"repo's record); nothing was changed — try again"
        )
    manifest = parse_manifest(data, source=f"{repo_id}@{commit[:12]}:{MANIFEST_FILE}")
    return _RemoteView(commit, files, manifest, mf.blob_id)


def _remote_moved(client: HubClient, remote: Remote, view: _RemoteView) -> str | None:
    """Why a push must not go ahead (the remote's library changed since the last sync), or None."""
    if view.head == remote.last_commit:
        return None
    if remote.last_commit is None:
        if view.manifest is None:
            return None
        return (
            f"{remote.repo_id} already holds a libstore library ({len(view.manifest.experts)} experts) "
            f"that this library has never pulled; run `libstore pull {remote.name}` first, then push"
        )
    if view.head is None:
        return f"{remote.repo_id} has no branch {remote.revision!r} any more (last synced at {remote.last_commit[:12]})"
    try:
        before = client.path_info(remote.repo_id, MANIFEST_FILE, remote.last_commit)
    except HubError as e:
        return f"the last synced commit {remote.last_commit[:12]} cannot be read ({e})"
    if (before.blob_id if before else None) == view.manifest_blob:
        return None  # only commits that left the manifest alone (e.g. files of an interrupted push)
    return (
        f"the remote {remote.name} ({remote.repo_id}@{remote.revision}) has new commits since this "
        f"library last synced with it (last synced {remote.last_commit[:12]}, now {view.head[:12]}); "
        f"run `libstore pull {remote.name}` first, then push again"
    )


# --- status --------------------------------------------------------------------------------------


def status(ctx: Context, remote: str | None = None, *, token: str | None = None) -> StatusReport:
    """Per expert: local only, remote only, in sync, changed (which side), conflict; and what
    push and pull would do. Reads the remote head's manifest; changes nothing."""
    with ctx.catalog.read() as s:
        row = remote_repo.remote_row(s, _remote_name(s, remote))
        rem = remote_repo.to_remote(s, row)
        synced = remote_repo.sync_state(s, row)
        local = _local_state(s)
    client = HubClient(token=token)
    with temp_dir(ctx, "status") as tmp:
        head = _head_or_none(client, rem)
        view = _read_remote(client, rem.repo_id, head, tmp)
        moved = _remote_moved(client, rem, view) is not None
    remote_entries = view.manifest.experts if view.manifest else {}
    plans = plan(local.digests(), {n: e.digest() for n, e in remote_entries.items()}, synced)
    counts: dict[str, int] = {}
    for p in plans:
        counts[p.state] = counts.get(p.state, 0) + 1
    return StatusReport(remote=rem, head=head, remote_moved=moved, experts=tuple(plans), counts=counts)


def _head_or_none(client: HubClient, rem: Remote) -> str | None:
    if not client.repo_exists(rem.repo_id):
        if rem.last_commit is not None:
            raise HubError(
                f"remote {rem.name}: repo {rem.repo_id} no longer exists (or this token cannot see it); "
                f"last synced at {rem.last_commit[:12]}"
            )
        return None
    return client.resolve(rem.repo_id, rem.revision)


# --- push ----------------------------------------------------------------------------------------


def push(
    ctx: Context,
    remote: str | None = None,
    *,
    experts: str | ExpertQuery | None = None,
    message: str | None = None,
    tag: str | None = None,
    token: str | None = None,
    force: bool = False,
    prune: bool = False,
    retries: int = COMMIT_RETRIES,
    max_files_per_commit: int = MAX_FILES_PER_COMMIT,
) -> PushReport:
    """Push the library (or the experts matching ``experts``) to a remote, incrementally.

    ``force`` uploads this library's version of conflicting experts; ``prune`` deletes on the
    remote the experts deleted here since the last sync. Refuses with :class:`RemoteMovedError` when
    the remote changed since the last sync, and with :class:`SyncConflictError` on conflicts.
    """
    if tag is not None:
        validate_name(tag)
    max_files_per_commit = max(3, min(max_files_per_commit, MAX_FILES_PER_COMMIT))
    with ctx.catalog.read() as s:
        row = remote_repo.remote_row(s, _remote_name(s, remote))
        rem = remote_repo.to_remote(s, row)
        synced = remote_repo.sync_state(s, row)
        local = _local_state(s)
    # prototypes are a cache: one whose blob is gone (gc, damage) is simply not pushed
    local.prototypes = {k: [c for c in v if ctx.blobs.exists(c.blob_sha256)] for k, v in local.prototypes.items()}
    client = HubClient(token=token)
    if not client.repo_exists(rem.repo_id):
        if rem.last_commit is not None:
            raise HubError(
                f"remote {rem.name}: repo {rem.repo_id} no longer exists (or this token cannot see it); "
                f"it was last synced at {rem.last_commit[:12]}. Remove the remote and add it again to "
                f"push a fresh copy"
            )
        client.create_repo(rem.repo_id, private=rem.private)
    if rem.last_commit is None and rem.revision != "main":
        client.ensure_branch(rem.repo_id, rem.revision)
    with temp_dir(ctx, "push") as tmp:
        head = client.resolve(rem.repo_id, rem.revision)
        view = _read_remote(client, rem.repo_id, head, tmp)
        why = _remote_moved(client, rem, view)
        if why is not None:
            raise RemoteMovedError(why)
        if tag is not None:
            existing = client.tag_target(rem.repo_id, tag)
            if existing is not None:
                raise HubError(
                    f"tag {tag!r} already exists on {rem.repo_id} (at {existing[:12]}); tags do not "
                    f"move — choose another name"
                )
        old = view.manifest or Manifest()
        selection = _select(experts, local.experts, old.experts)
        remote_d = {n: e.digest() for n, e in old.experts.items()}
        local_d = local.digests()
        plans = plan(local_d, remote_d, synced, selected=selection, force=force, prune=prune)
        conflicts = [p.name for p in plans if p.push == "conflict"]
        if conflicts:
            raise SyncConflictError(
                f"{len(conflicts)} expert(s) changed both here and on {rem.repo_id} since the last "
                f"sync: {', '.join(conflicts[:10])}{' ...' if len(conflicts) > 10 else ''}. Nothing was "
                f"pushed. Keep theirs: libstore pull {rem.name} --force; keep yours: libstore push "
                f"{rem.name} --force"
            )
        uploads = [p.name for p in plans if p.push == "upload"]
        deletes = [p.name for p in plans if p.push == "delete"]
        new = _new_manifest(old, local, uploads, deletes, selection)
        manifest_bytes = new.to_bytes()
        readme = modelcard.render(new, rem.repo_id).encode()

        adds, n_protos = _uploads(ctx, new, view.files)
        old_files = set(old.files())
        new_files = set(new.files())
        dels = sorted(p for p in old_files - new_files if p in view.files)
        final: list[tuple[str, Path | bytes, str | None]] = []
        mf = view.files.get(MANIFEST_FILE)
        if mf is None or mf.blob_id != git_blob_id(manifest_bytes):
            final.append((MANIFEST_FILE, manifest_bytes, None))
        rf = view.files.get(README_FILE)
        if rf is None or rf.blob_id != git_blob_id(readme):
            final.append((README_FILE, readme, None))

        summary = message or _summary(uploads, deletes, n_protos)
        commit = head
        n_commits = 0
        if adds or dels or final:
            commit, n_commits = _commit_all(
                client, rem, head, adds, final, dels, summary, retries, max_files_per_commit,
            )

    in_sync = [p.name for p in plans if p.state == "in_sync"]
    digests = {n: local_d[n] for n in [*uploads, *in_sync]}
    forget = [*deletes, *stale_sync_records(local_d, {n: e.digest() for n, e in new.experts.items()}, synced)]
    with ctx.catalog.write() as s:  # the remote has the commit: record it before anything else can fail
        row = remote_repo.remote_row(s, rem.name)
        remote_repo.record_sync(s, row, commit=commit, digests=digests, forget=forget)
    if tag is not None:
        try:
            client.create_tag(rem.repo_id, tag, commit)
        except HubError as e:
            raise HubError(f"pushed {commit[:12]} to {rem.repo_id}, but tagging it failed: {e}; "
                           f"tag it later by pushing again with --tag {tag}") from e
    return PushReport(
        remote=rem.name, repo_id=rem.repo_id, branch=rem.revision, commit=commit, previous_commit=head,
        commits=n_commits, files_uploaded=len(adds) + len(final),
        bytes_uploaded=sum(_size(src) for _, src, _ in [*adds, *final]),
        files_deleted=len(dels), uploaded=tuple(uploads), deleted=tuple(deletes), prototypes=n_protos,
        tag=tag, experts=tuple(plans),
    )


def _size(src: Path | bytes) -> int:
    return src.stat().st_size if isinstance(src, Path) else len(src)


def _summary(uploads: Sequence[str], deletes: Sequence[str], n_protos: int) -> str:
    parts = []
    if uploads:
        parts.append(f"{len(uploads)} expert(s) updated" if len(uploads) != 1 else f"update {uploads[0]}")
    if deletes:
        parts.append(f"{len(deletes)} removed")
    if n_protos:
        parts.append(f"{n_protos} prototype file(s)")
    return "libstore push: " + (", ".join(parts) or "refresh manifest")


def _new_manifest(
    old: Manifest, local: _Local, uploads: Sequence[str], deletes: Sequence[str], selection: set[str] | None,
) -> Manifest:
    experts = dict(old.experts)
    for n in uploads:
        experts[n] = local.experts[n]
    for n in deletes:
        experts.pop(n, None)
    clusterings = {**old.clusterings, **local.clusterings}  # small records: all travel, ours win
    bases: dict[str, BaseEntry] = {}
    wanted = {e.base_model for e in experts.values()} | {c.base_model for c in clusterings.values()}
    for name in sorted(wanted):
        lb, rb = local.bases.get(name), old.base_models.get(name)
        if lb is not None and rb is not None and lb.fingerprint != rb.fingerprint:
            raise BaseModelMismatchError(
                f"base model {name!r} here (fingerprint {lb.fingerprint[:12]}) is not the remote's "
                f"{name!r} ({rb.fingerprint[:12]}); experts of different models cannot share one name"
            )
        chosen = lb or rb
        if chosen is None:
            raise ValidationError(f"base model {name!r} is neither in this library nor in the remote's manifest")
        bases[name] = chosen
    # prototypes: the remote's for experts whose weights did not change, plus this library's
    # cached sets for every expert in scope whose weights equal the new manifest's
    keep = [p for p in old.prototypes if p.expert in experts and experts[p.expert].sha256 == p.expert_sha256]
    ours = []
    for n, e in experts.items():
        le = local.experts.get(n)
        if le is None or le.sha256 != e.sha256 or (selection is not None and n not in selection):
            continue
        for c in local.prototypes.get(e.sha256, []):
            ours.append(PrototypeEntry(
                expert=n, expert_sha256=c.expert_sha256, method=c.method, method_version=c.method_version,
                params_key=c.params_key, params=dict(c.params), sha256=c.blob_sha256,
                size=local.blob_sizes[c.blob_sha256],
            ))
    return Manifest(
        base_models=bases, experts=experts, clusterings=clusterings,
        prototypes=merge_prototypes(keep, ours), generator=_generator(),
    )


def _generator() -> str:
    from libstore import __version__

    return f"libstore {__version__}"


def _uploads(
    ctx: Context, new: Manifest, remote_files: Mapping[str, RemoteFile],
) -> tuple[list[tuple[str, Path | bytes, str | None]], int]:
    """Files of the new manifest whose content the remote head lacks, as (path, blob, sha256)."""
    adds: list[tuple[str, Path | bytes, str | None]] = []
    n_protos = 0
    for path, f in sorted(new.files().items()):
        rf = remote_files.get(path)
        if rf is not None and rf.size == f.size:
            if rf.sha256 is not None and rf.sha256 == f.sha256:
                continue
            if rf.sha256 is None and rf.size <= (1 << 20) and rf.blob_id == git_blob_id(ctx.blobs.read_bytes(f.sha256)):
                continue
        if not ctx.blobs.exists(f.sha256):
            raise IntegrityError(
                f"{path}: blob {f.sha256} is missing from this library's store; run `libstore verify` "
                f"(nothing was pushed)"
            )
        adds.append((path, ctx.blobs.path(f.sha256), f.sha256))
        if path.startswith("prototypes/"):
            n_protos += 1
    return adds, n_protos


def _commit_all(
    client: HubClient,
    rem: Remote,
    head: str,
    adds: list[tuple[str, Path | bytes, str | None]],
    final: list[tuple[str, Path | bytes, str | None]],
    dels: list[str],
    summary: str,
    retries: int,
    per_commit: int,
) -> tuple[str, int]:
    """Commit data files in bounded batches, then the manifest (+ README, deletions) last."""
    parent = head
    n = 0
    final_room = per_commit - len(final)
    if len(adds) + len(final) + len(dels) <= per_commit:
        batches: list[list[tuple[str, Path | bytes, str | None]]] = []
        last_adds, last_dels, rest_dels = [*adds, *final], dels, []
    else:
        batches = [adds[i:i + per_commit] for i in range(0, len(adds), per_commit)]
        last_adds, last_dels, rest_dels = final, dels[:final_room], dels[final_room:]
    total = len(batches) + 1 + (len(rest_dels) + per_commit - 1) // per_commit

    def landed(adds: list[tuple[str, Path | bytes, str | None]], dels: list[str]) -> Callable[[str], bool]:
        return lambda h: _has_commit_content(client, rem.repo_id, h, adds, dels)

    for i, batch in enumerate(batches):
        parent = _commit_once(client, rem, parent, batch, [], f"{summary} (files, part {i + 1}/{total})",
                              retries, landed(batch, []))
        n += 1
    parent = _commit_once(client, rem, parent, last_adds, last_dels, summary, retries,
                          landed(last_adds, last_dels))
    n += 1
    for i in range(0, len(rest_dels), per_commit):
        chunk = rest_dels[i:i + per_commit]
        parent = _commit_once(client, rem, parent, [], chunk, f"{summary} (cleanup)", retries, landed([], chunk))
        n += 1
    return parent, n


def _has_commit_content(
    client: HubClient, repo_id: str, commit: str, adds: Sequence[tuple[str, Path | bytes, str | None]],
    dels: Sequence[str],
) -> bool:
    """Does ``commit`` hold exactly what our (possibly lost) commit wrote? (Then it landed.)"""
    files = client.list_files(repo_id, commit)
    for path, src, sha in adds:
        rf = files.get(path)
        if rf is None:
            return False
        if isinstance(src, bytes):
            if rf.blob_id != git_blob_id(src):
                return False
        elif sha is not None and rf.sha256 is not None and rf.sha256 != sha:
            return False
    return not any(p in files for p in dels)


def _commit_once(
    client: HubClient,
    rem: Remote,
    parent: str,
    adds: list[tuple[str, Path | bytes, str | None]],
    dels: list[str],
    message: str,
    retries: int,
    landed: Callable[[str], bool],
) -> str:
    """One commit on ``parent``; on failure, check the head before retrying (it may have landed)."""
    attempt = 0
    while True:
        try:
            return client.commit(rem.repo_id, adds=adds, deletes=dels, message=message,
                                 branch=rem.revision, parent_commit=parent)
        except RemoteMovedError:
            if attempt == 0:
                raise
            now = client.resolve(rem.repo_id, rem.revision)
            if now != parent and landed(now):
                return now
            raise
        except HubError as e:
            try:
                now = client.resolve(rem.repo_id, rem.revision)
            except HubError as e2:
                raise HubError(
                    f"{e}; the remote could not be checked afterwards ({e2}), so this push may or "
                    f"may not have landed — run `libstore status` when the Hub is reachable"
                ) from e
            if now != parent:
                if landed(now):
                    log.info("commit on %s landed although its answer was lost", rem.repo_id)
                    return now
                raise RemoteMovedError(
                    f"{rem.repo_id} moved while this push was running (now at {now[:12]}); "
                    f"run `libstore pull {rem.name}` and push again"
                ) from e
            if attempt >= retries or not is_transient(e):
                raise HubError(f"{e}; nothing was pushed: the remote is still at {parent[:12]}") from e
            attempt += 1
            time.sleep(min(4.0, 0.5 * 2 ** (attempt - 1)))


# --- pull ----------------------------------------------------------------------------------------


def pull(
    ctx: Context,
    remote: str | None = None,
    *,
    revision: str | None = None,
    experts: str | ExpertQuery | None = None,
    token: str | None = None,
    force: bool = False,
    prune: bool = False,
    workers: int = DOWNLOAD_WORKERS,
) -> PullReport:
    """Pull the remote's experts (or those matching ``experts``) at a branch, tag or commit.

    ``force`` takes the remote's version of conflicting experts; ``prune`` removes experts here
    that were deleted on the remote (and not changed here) since the last sync.
    """
    with ctx.catalog.read() as s:
        row = remote_repo.remote_row(s, _remote_name(s, remote))
        rem = remote_repo.to_remote(s, row)
    client = HubClient(token=token)
    rev = revision or rem.revision
    commit = client.resolve(rem.repo_id, rev)
    at_head = rev == rem.revision or commit == client.resolve(rem.repo_id, rem.revision)
    with temp_dir(ctx, "pull") as tmp:
        view = _read_remote(client, rem.repo_id, commit, tmp)
        if view.manifest is None:
            raise ValidationError(
                f"{rem.repo_id}@{rev} has no {MANIFEST_FILE}, so it is not a libstore library; import a "
                f"single PEFT adapter with: libstore import-hub {rem.repo_id} [--subfolder PATH]"
            )
        manifest = view.manifest
        _check_remote_files(rem.repo_id, commit, manifest, view.files)
        with ctx.catalog.read() as s:
            synced = remote_repo.sync_state(s, remote_repo.remote_row(s, rem.name))
            local = _local_state(s)
        selection = _select(experts, manifest.experts, local.experts)
        remote_d = {n: e.digest() for n, e in manifest.experts.items()}
        local_d = local.digests()
        plans = plan(local_d, remote_d, synced, selected=selection, force=force, prune=prune)
        fetch = [p.name for p in plans if p.pull == "download"]
        removes = [p.name for p in plans if p.pull == "remove"]
        conflicts = [p.name for p in plans if p.pull == "conflict"]
        entries = [manifest.experts[n] for n in fetch]
        for base in {e.base_model for e in entries}:
            lb = local.bases.get(base)
            rb = manifest.base_models[base]
            if lb is not None and lb.fingerprint != rb.fingerprint:
                raise BaseModelMismatchError(
                    f"the remote's base model {base!r} ({rb.architecture}, fingerprint {rb.fingerprint[:12]}) "
                    f"is not this library's {base!r} ({lb.fingerprint[:12]}); nothing was pulled"
                )
        # prototypes for experts whose weights will equal the manifest's after this pull
        in_scope = set(fetch) | {p.name for p in plans if p.state == "in_sync" and p.selected}
        with ctx.catalog.read() as s:
            protos = [
                p for p in manifest.prototypes
                if p.expert in in_scope and not proto_repo.find_cached(
                    s, [p.expert_sha256], method=p.method, method_version=p.method_version, key=p.params_key)
            ]
        for p in protos:
            if proto_repo.params_key(p.params) != p.params_key:
                raise IntegrityError(
                    f"{p.path}: its params_key does not match its params in the manifest; nothing was changed"
                )
        needed: dict[str, tuple[str, int]] = {}  # sha256 -> (repo path, size)
        for e in entries:
            for path, f in e.repo_files().items():
                needed.setdefault(f.sha256, (path, f.size))
        for p in protos:
            needed.setdefault(p.sha256, (p.path, p.size))
        missing = {sha: v for sha, v in needed.items() if not ctx.blobs.exists(sha)}
        _download(ctx, client, rem.repo_id, commit, missing, tmp, workers)
        _validate_experts(ctx, entries, manifest, tmp)
        source = f"hf://{rem.repo_id}@{commit}"
        with ctx.catalog.write() as s:
            added, updated, new_clusterings, skipped_clusterings = _apply(
                s, manifest, entries, removes, protos, source,
            )
            row = remote_repo.remote_row(s, rem.name)
            in_sync = [p.name for p in plans if p.state == "in_sync"]
            digests = {n: remote_d[n] for n in [*fetch, *in_sync]}
            forget = [*removes, *stale_sync_records(local_d, remote_d, synced)]
            remote_repo.record_sync(s, row, commit=commit, digests=digests, forget=forget, last_commit=at_head)
    return PullReport(
        remote=rem.name, repo_id=rem.repo_id, revision=rev, commit=commit,
        files_downloaded=len(missing), bytes_downloaded=sum(size for _, size in missing.values()),
        files_reused=len(needed) - len(missing), added=tuple(added), updated=tuple(updated),
        removed=tuple(removes), conflicts=tuple(conflicts), prototypes=len(protos),
        clusterings=tuple(new_clusterings), clusterings_skipped=tuple(skipped_clusterings),
        experts=tuple(plans),
    )


def _check_remote_files(repo_id: str, commit: str, m: Manifest, files: Mapping[str, RemoteFile]) -> None:
    """Every file the manifest names exists in the commit with its size (and LFS sha256)."""
    missing, wrong = [], []
    for path, f in sorted(m.files().items()):
        rf = files.get(path)
        if rf is None:
            missing.append(path)
        elif rf.size != f.size or (rf.sha256 is not None and rf.sha256 != f.sha256):
            wrong.append(path)
    if missing or wrong:
        bad = missing or wrong
        what = "missing from" if missing else "different in"
        raise IntegrityError(
            f"the manifest of {repo_id}@{commit[:12]} names {len(bad)} file(s) {what} that commit, e.g. "
            f"{bad[0]}; the remote library is incomplete or inconsistent — nothing was changed"
        )


def _download(
    ctx: Context, client: HubClient, repo_id: str, commit: str, missing: Mapping[str, tuple[str, int]],
    tmp: Path, workers: int,
) -> None:
    """Fetch blobs into the store, each checked against its sha256 and size; parallel, fail fast."""
    if not missing:
        return

    def one(sha: str, path: str, size: int) -> None:
        dest = tmp / "dl" / uuid.uuid4().hex
        local = client.download(repo_id, path, commit, dest)
        try:
            got = local.stat().st_size
            if got != size:
                raise IntegrityError(
                    f"{path} from {repo_id}@{commit[:12]} has {got} bytes, the manifest says {size}; "
                    f"the download is incomplete or the remote is inconsistent — nothing was changed, "
                    f"pull again to resume"
                )
            try:
                ctx.blobs.put_file(local, expected_sha256=sha)
            except IntegrityError as e:
                raise IntegrityError(
                    f"{path} from {repo_id}@{commit[:12]} does not match its sha256 in the manifest "
                    f"({e}); nothing was changed, pull again to resume"
                ) from None
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    pool = cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="libstore-pull")
    try:
        futures = [pool.submit(one, sha, path, size) for sha, (path, size) in sorted(missing.items())]
        for fut in cf.as_completed(futures):
            fut.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _validate_experts(ctx: Context, entries: Sequence[ExpertEntry], m: Manifest, tmp: Path) -> None:
    """Re-validate every pulled expert's PEFT folder and check the manifest's claims against it."""
    for e in entries:
        folder = tmp / "check" / e.name
        folder.mkdir(parents=True)
        for fname, f in e.files.items():
            src = ctx.blobs.path(f.sha256)
            try:
                os.link(src, folder / fname)
            except OSError:
                shutil.copyfile(src, folder / fname)
        try:
            adapter = read_adapter(folder)
        except LibstoreError as err:
            raise type(err)(f"expert {e.name!r} from the remote: {err}") from None
        claims = {
            "rank": (e.rank, adapter.rank), "alpha": (e.alpha, adapter.alpha),
            "use_rslora": (e.use_rslora, adapter.use_rslora), "dtype": (e.dtype, adapter.dtype),
            "target_modules": (tuple(e.target_modules), tuple(adapter.target_modules)),
            "modules": ({k: tuple(v) for k, v in e.modules.items()},
                        {k: (s.in_features, s.out_features, s.rank) for k, s in adapter.modules.items()}),
        }
        for what, (said, real) in claims.items():
            if said != real:
                raise IntegrityError(
                    f"expert {e.name!r}: the manifest says {what}={str(said)[:80]} but its files say "
                    f"{str(real)[:80]}; the remote is inconsistent — nothing was changed"
                )
        # the base's identity is its fingerprint (checked before); shapes are checked here
        check_against_base(adapter, _base_model(m.base_models[e.base_model]), allow_base_mismatch=True)
        shutil.rmtree(folder, ignore_errors=True)


def _apply(
    s: Session,
    m: Manifest,
    entries: Sequence[ExpertEntry],
    removes: Sequence[str],
    protos: Sequence[PrototypeEntry],
    source: str,
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Write a verified pull into the catalog (the caller's transaction)."""
    entry_bases = {e.base_model for e in entries}
    bases = {}
    for name in sorted(entry_bases | {c.base_model for c in m.clusterings.values()}):
        rb = _base_model(m.base_models[name])
        if name in entry_bases:
            bases[name] = remote_repo.ensure_base(s, rb)
            continue
        have = s.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
        if have is not None and have.fingerprint == rb.fingerprint:
            bases[name] = have  # clusterings of bases this library has come along
    new_clusterings, skipped = [], []
    for name, c in sorted(m.clusterings.items()):
        if c.base_model not in bases:
            continue
        mine = remote_repo.clustering(s, name)
        data = _clustering_data(c)
        if mine is None:
            remote_repo.insert_clustering(s, data)
            new_clusterings.append(name)
        elif mine != data:
            skipped.append(name)
    added, updated = [], []
    for e in entries:
        base_row = bases[e.base_model]
        files = [StoredFile(fname, f.sha256, f.size) for fname, f in sorted(e.files.items())]
        try:
            cid = remote_repo.cluster_id(s, e.cluster)
        except NotFoundError:
            cid = None
        modules = {k: ModuleShape(*v) for k, v in e.modules.items()}
        if repo.expert_exists(s, e.name):
            row = repo.expert_row(s, e.name)
            repo.replace_files(
                s, row, files, ADAPTER_WEIGHTS, kind=e.kind, base_model=base_row, rank=e.rank,
                alpha=e.alpha, use_rslora=e.use_rslora, target_modules=list(e.target_modules),
                module_shapes={k: [v.in_features, v.out_features, v.rank] for k, v in modules.items()},
                dtype=e.dtype, extra=dict(e.metadata), cluster_id=cid, source=source,
            )
            row.tasks = [repo.task_row(s, t) for t in e.tasks]
            row.tags = [repo.tag_row(s, t) for t in e.tags]
            updated.append(e.name)
        else:
            row = repo.insert_expert(
                s, name=e.name, kind=e.kind, base=base_row, rank=e.rank, alpha=e.alpha,
                use_rslora=e.use_rslora, target_modules=e.target_modules, modules=modules, dtype=e.dtype,
                files=files, weights_file=ADAPTER_WEIGHTS, source=source, metadata=dict(e.metadata),
                tasks=e.tasks, tags=e.tags, cluster_id=cid,
            )
            added.append(e.name)
        s.flush()
    for e in entries:
        d = e.derivation
        remote_repo.set_derivation(s, repo.expert_row(s, e.name), None if d is None else DerivationData(
            method=d.method, method_version=d.method_version, params=dict(d.params),
            inputs_key=d.inputs_key, parents=tuple(d.parents),
        ))
    for name in removes:
        if repo.expert_exists(s, name):
            repo.delete_expert(s, repo.expert_row(s, name))
    remote_repo.link_experts(s, [e.name for e in entries])
    for p in protos:
        proto_repo.record(
            s, expert_sha256=p.expert_sha256, method=p.method, method_version=p.method_version,
            params=dict(p.params), blob_sha256=p.sha256, blob_size=p.size,
        )
    return added, updated, new_clusterings, skipped
