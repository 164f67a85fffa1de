"""Push a library to its Hub remote: only what the remote lacks, in commits of at most 100 files with
the manifest last, guarded by ``parent_commit``; a lost answer is checked against the head before retrying.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from libstore.catalog import remotes as remote_repo
from libstore.catalog.remotes import Remote
from libstore.errors import (
    BaseModelMismatchError,
    HubError,
    IntegrityError,
    RemoteMovedError,
    SyncConflictError,
    ValidationError,
)
from libstore.hub import modelcard
from libstore.hub.client import (
    MAX_FILES_PER_COMMIT,
    HubClient,
    RemoteFile,
    git_blob_id,
    is_transient,
)
from libstore.hub.manifest import (
    MANIFEST_FILE,
    README_FILE,
    BaseEntry,
    Manifest,
    PrototypeEntry,
    merge_prototypes,
)
from libstore.hub.plan import (
    plan,
    stale_sync_records,
)
from libstore.ops.context import Context
from libstore.ops.sync import (
    COMMIT_RETRIES,
    PushReport,
    _Local,
    _local_state,
    _read_remote,
    _remote_moved,
    _remote_name,
    _select,
    temp_dir,
)
from libstore.store.adapter import validate_name
from libstore.types import (
    ExpertQuery,
)

log = logging.getLogger(__name__)


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
    local.prototypes = {
        k: [c for c in v if ctx.blobs.exists(c.blob_sha256)] for k, v in local.prototypes.items()
    }
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
                client,
                rem,
                head,
                adds,
                final,
                dels,
                summary,
                retries,
                max_files_per_commit,
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
            raise HubError(
                f"pushed {commit[:12]} to {rem.repo_id}, but tagging it failed: {e}; "
                f"tag it later by pushing again with --tag {tag}"
            ) from e
    return PushReport(
        remote=rem.name,
        repo_id=rem.repo_id,
        branch=rem.revision,
        commit=commit,
        previous_commit=head,
        commits=n_commits,
        files_uploaded=len(adds) + len(final),
        bytes_uploaded=sum(_size(src) for _, src, _ in [*adds, *final]),
        files_deleted=len(dels),
        uploaded=tuple(uploads),
        deleted=tuple(deletes),
        prototypes=n_protos,
        tag=tag,
        experts=tuple(plans),
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
    old: Manifest,
    local: _Local,
    uploads: Sequence[str],
    deletes: Sequence[str],
    selection: set[str] | None,
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
            raise ValidationError(
                f"base model {name!r} is neither in this library nor in the remote's manifest"
            )
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
            ours.append(
                PrototypeEntry(
                    expert=n,
                    expert_sha256=c.expert_sha256,
                    method=c.method,
                    method_version=c.method_version,
                    params_key=c.params_key,
                    params=dict(c.params),
                    sha256=c.blob_sha256,
                    size=local.blob_sizes[c.blob_sha256],
                )
            )
    return Manifest(
        base_models=bases,
        experts=experts,
        clusterings=clusterings,
        prototypes=merge_prototypes(keep, ours),
        generator=_generator(),
    )


def _generator() -> str:
    from libstore import __version__

    return f"libstore {__version__}"


def _uploads(
    ctx: Context,
    new: Manifest,
    remote_files: Mapping[str, RemoteFile],
) -> tuple[list[tuple[str, Path | bytes, str | None]], int]:
    """Files of the new manifest whose content the remote head lacks, as (path, blob, sha256)."""
    adds: list[tuple[str, Path | bytes, str | None]] = []
    n_protos = 0
    for path, f in sorted(new.files().items()):
        rf = remote_files.get(path)
        if rf is not None and rf.size == f.size:
            if rf.sha256 is not None and rf.sha256 == f.sha256:
                continue
            if (
                rf.sha256 is None
                and rf.size <= (1 << 20)
                and rf.blob_id == git_blob_id(ctx.blobs.read_bytes(f.sha256))
            ):
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
        batches = [adds[i : i + per_commit] for i in range(0, len(adds), per_commit)]
        last_adds, last_dels, rest_dels = final, dels[:final_room], dels[final_room:]
    total = len(batches) + 1 + (len(rest_dels) + per_commit - 1) // per_commit

    def landed(adds: list[tuple[str, Path | bytes, str | None]], dels: list[str]) -> Callable[[str], bool]:
        return lambda h: _has_commit_content(client, rem.repo_id, h, adds, dels)

    for i, batch in enumerate(batches):
        parent = _commit_once(
            client,
            rem,
            parent,
            batch,
            [],
            f"{summary} (files, part {i + 1}/{total})",
            retries,
            landed(batch, []),
        )
        n += 1
    parent = _commit_once(
        client, rem, parent, last_adds, last_dels, summary, retries, landed(last_adds, last_dels)
    )
    n += 1
    for i in range(0, len(rest_dels), per_commit):
        chunk = rest_dels[i : i + per_commit]
        parent = _commit_once(
            client, rem, parent, [], chunk, f"{summary} (cleanup)", retries, landed([], chunk)
        )
        n += 1
    return parent, n


def _has_commit_content(
    client: HubClient,
    repo_id: str,
    commit: str,
    adds: Sequence[tuple[str, Path | bytes, str | None]],
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
            return client.commit(
                rem.repo_id,
                adds=adds,
                deletes=dels,
                message=message,
                branch=rem.revision,
                parent_commit=parent,
            )
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
