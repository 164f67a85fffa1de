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

import contextlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from libstore.catalog import clusterings as clustering_repo
from libstore.catalog import derivations as derivation_repo
from libstore.catalog import prototypes as proto_repo
from libstore.catalog import remotes as remote_repo
from libstore.catalog import repo
from libstore.catalog.models import BlobRow
from libstore.catalog.remotes import Remote
from libstore.errors import (
    HubError,
    IntegrityError,
    NotFoundError,
    ValidationError,
)
from libstore.hub.client import (
    HubClient,
    RemoteFile,
    check_repo_id,
    git_blob_id,
)
from libstore.hub.manifest import (
    EXPERT_FILES,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    BaseEntry,
    ClusterEntry,
    ClusteringEntry,
    DerivationEntry,
    ExpertEntry,
    FileEntry,
    Manifest,
    parse_manifest,
)
from libstore.hub.plan import (
    ExpertPlan,
    matches,
    plan,
)
from libstore.ops.context import Context
from libstore.ops.query import parse_query
from libstore.store.adapter import validate_name
from libstore.types import (
    BaseModel,
    ClusteringInput,
    ClusteringRecord,
    ClusterRecord,
    Derivation,
    Expert,
    ExpertQuery,
    LinearShape,
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


def add_remote(
    ctx: Context, name: str, repo_id: str, *, revision: str = "main", private: bool = False
) -> Remote:
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


def _expert_entry(e: Expert, d: Derivation | None) -> ExpertEntry:
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
        derivation=None
        if d is None
        else DerivationEntry(
            method=d.method,
            method_version=d.method_version,
            params=dict(d.params),
            inputs_key=d.inputs_key,
            parents=tuple((p.role, p.name, p.sha256) for p in d.parents),
        ),
        cluster=e.cluster,
    )


def _base_entry(b: BaseModel) -> BaseEntry:
    return BaseEntry(
        name=b.name,
        source=b.source,
        revision=b.revision,
        architecture=b.architecture,
        model_type=b.model_type,
        fingerprint=b.fingerprint,
        linear_shapes={m: (s.in_features, s.out_features) for m, s in b.linear_shapes.items()},
    )


def _base_model(b: BaseEntry) -> BaseModel:
    return BaseModel(
        name=b.name,
        source=b.source,
        revision=b.revision,
        architecture=b.architecture,
        model_type=b.model_type,
        fingerprint=b.fingerprint,
        linear_shapes={m: LinearShape(*s) for m, s in b.linear_shapes.items()},
    )


def _clustering_entry(c: ClusteringRecord) -> ClusteringEntry:
    return ClusteringEntry(
        name=c.name,
        base_model=c.base_model,
        method=c.method,
        metric=c.metric,
        k=c.k,
        seed=c.seed,
        params=dict(c.params),
        criterion=dict(c.criterion),
        query=c.query,
        inputs=tuple((i.name, i.sha256) for i in c.inputs),
        clusters=tuple(
            ClusterEntry(
                index=k.index,
                label=k.label,
                stats=dict(k.stats),
                members=tuple(k.members),
                tasks=tuple(k.tasks),
            )
            for k in c.clusters
        ),
    )


def _clustering_record(c: ClusteringEntry) -> ClusteringRecord:
    return ClusteringRecord(
        name=c.name,
        base_model=c.base_model,
        method=c.method,
        metric=c.metric,
        k=c.k,
        seed=c.seed,
        params=dict(c.params),
        criterion=dict(c.criterion),
        query=c.query,
        inputs=tuple(ClusteringInput(n, sha) for n, sha in c.inputs),
        clusters=tuple(
            ClusterRecord(
                index=k.index,
                label=k.label,
                stats=dict(k.stats),
                members=tuple(k.members),
                tasks=tuple(k.tasks),
            )
            for k in c.clusters
        ),
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
    derivs = derivation_repo.derivations_of(s, [r.name for r in rows])
    experts = {}
    for row in rows:
        e = repo.to_expert(s, row, with_lineage=False)
        experts[e.name] = _expert_entry(e, derivs.get(row.name))
    protos: dict[str, list[proto_repo.CacheEntry]] = {}
    for p in proto_repo.entries(s):
        protos.setdefault(p.expert_sha256, []).append(p)
    shas = sorted({p.blob_sha256 for ps in protos.values() for p in ps})
    sizes: dict[str, int] = {}
    for i in range(0, len(shas), 500):
        sizes.update(
            (h, n)
            for h, n in s.execute(
                select(BlobRow.sha256, BlobRow.size).where(BlobRow.sha256.in_(shas[i : i + 500]))
            )
        )
    return _Local(
        experts=experts,
        bases={b.name: _base_entry(b) for b in repo.list_bases(s)},
        clusterings={c.name: _clustering_entry(c) for c in clustering_repo.clustering_records(s)},
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
        return (
            f"{remote.repo_id} has no branch {remote.revision!r} any more "
            f"(last synced at {remote.last_commit[:12]})"
        )
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
