"""Push a library to its Hub remote: only what the remote lacks, in commits of at most 100 files with
the manifest last, guarded by ``parent_commit``.

A commit whose answer was lost (timeout, 5xx after the server applied it) is looked for at the head
before retrying; it counts as ours only if the head holds exactly our content (LFS sha256 / git blob
ids of every file we wrote, none of those we deleted). Before the manifest of a batched push is
committed, the real head is read again: if its manifest is not the one the push planned against
(another library pushed in between), the push refuses with :class:`RemoteMovedError` — pull first —
instead of writing a manifest built from a stale head, which would drop the other library's experts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from libstore.catalog import remotes as remote_repo
from libstore.errors import (
    BaseModelMismatchError,
    HubError,
    IntegrityError,
    RemoteMovedError,
    SyncConflictError,
    ValidationError,
)
from libstore.hub import modelcard
from libstore.hub.client import MAX_FILES_PER_COMMIT, HubClient, RemoteFile, git_blob_id, is_transient
from libstore.hub.manifest import MANIFEST_FILE, README_FILE, Manifest, PrototypeEntry, merge_prototypes
from libstore.hub.plan import ExpertPlan, plan, stale_sync_records
from libstore.ops.context import Context
from libstore.ops.sync_state import (
    COMMIT_RETRIES,
    LocalState,
    RemoteView,
    local_state,
    read_remote,
    select_experts,
    temp_dir,
    why_remote_moved,
)
from libstore.store.adapter import validate_name
from libstore.types import BaseModel, ExpertQuery, Remote

log = logging.getLogger(__name__)

#: One file of a commit: (path in the repo, local file or bytes, expected sha256 or None).
Upload = tuple[str, Path | bytes, str | None]


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
class PushOptions:
    """The options of ``libstore push`` and ``Library.push``: which experts, the commit's message and
    tag, the token (never shown), and what to do with conflicts (``force``) and deletions (``prune``)."""

    experts: str | ExpertQuery | None = None
    message: str | None = None
    tag: str | None = None
    token: str | None = field(default=None, repr=False)
    force: bool = False
    prune: bool = False


def push(
    ctx: Context,
    remote: str | None = None,
    *,
    options: PushOptions,
    retries: int = COMMIT_RETRIES,
    max_files_per_commit: int = MAX_FILES_PER_COMMIT,
) -> PushReport:
    """Push the library (or the experts matching ``experts``) to a remote, incrementally.

    ``force`` uploads this library's version of conflicting experts; ``prune`` deletes on the
    remote the experts deleted here since the last sync. Refuses with :class:`RemoteMovedError` when
    the remote changed since the last sync, and with :class:`SyncConflictError` on conflicts.
    """
    experts, message, tag, token = options.experts, options.message, options.tag, options.token
    force, prune = options.force, options.prune
    if tag is not None:
        validate_name(tag)
    if message is not None and any("\ud800" <= c <= "\udfff" for c in message):
        raise ValidationError("the commit message holds a lone surrogate, which is not text", field="message")
    max_files_per_commit = max(3, min(max_files_per_commit, MAX_FILES_PER_COMMIT))
    with ctx.catalog.read() as s:
        rem = remote_repo.resolve_remote(s, remote)
        synced = remote_repo.sync_state(s, rem.name)
        local = local_state(s)
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
                f"push a fresh copy",
                repo_id=rem.repo_id,
                status=404,
            )
        client.create_repo(rem.repo_id, private=rem.private)
    if rem.last_commit is None and rem.revision != "main":
        client.ensure_branch(rem.repo_id, rem.revision)
    with temp_dir(ctx, "push") as tmp:
        head = client.resolve(rem.repo_id, rem.revision)
        view = read_remote(client, rem.repo_id, head, tmp)
        why = why_remote_moved(client, rem, view)
        if why is not None:
            raise RemoteMovedError(why, repo_id=rem.repo_id)
        if tag is not None:
            existing = client.tag_target(rem.repo_id, tag)
            if existing is not None:
                raise HubError(
                    f"tag {tag!r} already exists on {rem.repo_id} (at {existing[:12]}); tags do not "
                    f"move — choose another name",
                    repo_id=rem.repo_id,
                )
        old = view.manifest or Manifest()
        selection = select_experts(experts, local.experts, old.experts)
        local_d = local.digests()
        plans = plan(local_d, old.digests(), synced, selected=selection, force=force, prune=prune)
        conflicts = [p.name for p in plans if p.push == "conflict"]
        if conflicts:
            raise SyncConflictError(
                f"{len(conflicts)} expert(s) changed both here and on {rem.repo_id} since the last "
                f"sync: {', '.join(conflicts[:10])}{' ...' if len(conflicts) > 10 else ''}. Nothing was "
                f"pushed. Keep theirs: libstore pull {rem.name} --force; keep yours: libstore push "
                f"{rem.name} --force",
                repo_id=rem.repo_id,
            )
        uploads = [p.name for p in plans if p.push == "upload"]
        deletes = [p.name for p in plans if p.push == "delete"]
        new = _new_manifest(old, local, uploads, deletes, selection)
        adds, n_protos = _uploads(ctx, new, view.files)
        dels = sorted(p for p in set(old.files()) - set(new.files()) if p in view.files)
        final = _final_files(new, rem.repo_id, view.files)
        summary = message or _summary(uploads, deletes, n_protos)
        commit = head
        n_commits = 0
        if adds or dels or final:
            pusher = _Pusher(ctx, client, rem, view, new, retries, max_files_per_commit)
            commit, n_commits, sent = pusher.run(adds, final, dels, summary)
            adds = sent

    in_sync = [p.name for p in plans if p.state == "in_sync"]
    digests = {n: local_d[n] for n in [*uploads, *in_sync]}
    forget = [*deletes, *stale_sync_records(local_d, new.digests(), synced)]
    with ctx.catalog.write() as s:  # the remote has the commit: record it before anything else can fail
        remote_repo.record_sync(s, rem.name, commit=commit, digests=digests, forget=forget)
    if tag is not None:
        try:
            client.create_tag(rem.repo_id, tag, commit)
        except HubError as e:
            raise HubError(
                f"pushed {commit[:12]} to {rem.repo_id}, but tagging it failed: {e}; "
                f"tag it later by pushing again with --tag {tag}",
                repo_id=rem.repo_id,
                status=e.status,
            ) from e
    return PushReport(
        remote=rem.name,
        repo_id=rem.repo_id,
        branch=rem.revision,
        commit=commit,
        previous_commit=head,
        commits=n_commits,
        files_uploaded=len(adds),
        bytes_uploaded=sum(_size(src) for _, src, _ in adds),
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
    local: LocalState,
    uploads: Sequence[str],
    deletes: Sequence[str],
    selection: set[str] | None,
) -> Manifest:
    """The remote's manifest with this library's uploads laid over it and its deletions removed:
    every other entry of ``old`` is kept as it is."""
    experts = dict(old.experts)
    for n in uploads:
        experts[n] = local.experts[n]
    for n in deletes:
        experts.pop(n, None)
    clusterings = {**old.clusterings, **local.clusterings}  # small records: all travel, ours win
    bases: dict[str, BaseModel] = {}
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
    keep = [
        p
        for p in old.prototypes
        if p.expert in experts and experts[p.expert].sha256 == p.prototypes.expert_sha256
    ]
    ours = []
    for n, e in experts.items():
        le = local.experts.get(n)
        if le is None or le.sha256 != e.sha256 or (selection is not None and n not in selection):
            continue
        ours += [PrototypeEntry(n, ps) for ps in local.prototypes.get(e.sha256, [])]
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


def _final_files(new: Manifest, repo_id: str, remote_files: Mapping[str, RemoteFile]) -> list[Upload]:
    """The manifest and the model card, where they differ from the remote's."""
    out: list[Upload] = []
    for path, data in (
        (MANIFEST_FILE, new.to_bytes()),
        (README_FILE, modelcard.render(new, repo_id).encode()),
    ):
        rf = remote_files.get(path)
        if rf is None or rf.blob_id != git_blob_id(data):
            out.append((path, data, None))
    return out


def _holds(ctx: Context, rf: RemoteFile | None, sha256: str, size: int) -> bool:
    """Does a remote file hold exactly the content of our blob ``sha256``?"""
    if rf is None or rf.size != size:
        return False
    if rf.sha256 is not None:
        return rf.sha256 == sha256
    return size <= (1 << 20) and rf.blob_id == git_blob_id(ctx.blobs.read_bytes(sha256))


def _uploads(ctx: Context, new: Manifest, remote_files: Mapping[str, RemoteFile]) -> tuple[list[Upload], int]:
    """Files of the new manifest whose content the remote lacks, as (path, blob, sha256)."""
    wanted: list[tuple[str, str]] = []
    n_protos = 0
    for path, f in sorted(new.files().items()):
        if _holds(ctx, remote_files.get(path), f.sha256, f.size):
            continue
        if not ctx.blobs.exists(f.sha256):
            raise IntegrityError(
                f"{path}: blob {f.sha256} is missing from this library's store; run `libstore verify` "
                f"(nothing was pushed)",
                sha256=f.sha256,
                path=path,
            )
        wanted.append((path, f.sha256))
        if path.startswith("prototypes/"):
            n_protos += 1
    ctx.blobs.fetch(sha for _, sha in wanted)  # a team library downloads them in parallel
    adds: list[Upload] = [(path, ctx.blobs.path(sha), sha) for path, sha in wanted]
    return adds, n_protos


class _Pusher:
    """The commits of one push, against one remote head."""

    def __init__(
        self,
        ctx: Context,
        client: HubClient,
        rem: Remote,
        view: RemoteView,
        new: Manifest,
        retries: int,
        per_commit: int,
    ) -> None:
        self.ctx, self.client, self.rem, self.view, self.new = ctx, client, rem, view, new
        self.retries, self.per_commit = retries, per_commit
        self.ours: set[str] = set()  # commits whose id the server answered to our own request

    def run(
        self, adds: list[Upload], final: list[Upload], dels: list[str], summary: str
    ) -> tuple[str, int, list[Upload]]:
        """Commit everything; returns the head, the number of commits and the files sent."""
        assert self.view.head is not None
        per = self.per_commit
        if len(adds) + len(final) + len(dels) <= per:
            head = self._commit(self.view.head, [*adds, *final], dels, summary)
            return head, 1, [*adds, *final]
        parent = self.view.head
        batches = [adds[i : i + per] for i in range(0, len(adds), per)]
        room = per - len(final)
        last_dels, rest_dels = dels[:room], dels[room:]
        total = len(batches) + 1 + (len(rest_dels) + per - 1) // per
        n = 0
        for i, batch in enumerate(batches):
            parent = self._commit(parent, batch, [], f"{summary} (files, part {i + 1}/{total})")
            n += 1
        parent, extra, last_dels = self._recheck(parent, last_dels, room)
        parent = self._commit(parent, [*extra, *final], last_dels, summary)
        n += 1
        for i in range(0, len(rest_dels), per):
            parent = self._commit(parent, [], rest_dels[i : i + per], f"{summary} (cleanup)")
            n += 1
        return parent, n, [*adds, *extra, *final]

    def _recheck(self, parent: str, dels: list[str], room: int) -> tuple[str, list[Upload], list[str]]:
        """Before the manifest goes up: the real head must hold the manifest this push planned
        against, and every file the new manifest names (else: pull first)."""
        rem = self.rem
        real = self.client.resolve(rem.repo_id, rem.revision)
        if real == parent and parent in self.ours:
            return parent, [], dels
        files = self.client.list_files(rem.repo_id, real)
        mf = files.get(MANIFEST_FILE)
        if (mf.blob_id if mf else None) != self.view.manifest_blob:
            raise RemoteMovedError(
                f"{rem.repo_id} moved while this push was running: another push changed its manifest "
                f"(now at {real[:12]}). This library's files are there, its manifest is not; run "
                f"`libstore pull {rem.name}` and push again (the files will not be sent twice)",
                repo_id=rem.repo_id,
            )
        extra, _ = _uploads(self.ctx, self.new, files)  # files someone else overwrote meanwhile
        dels = [p for p in dels if p in files]
        if len(extra) + len(dels) > room:
            raise RemoteMovedError(
                f"{rem.repo_id} moved while this push was running (now at {real[:12]}) and changed "
                f"{len(extra)} of this push's files; push again",
                repo_id=rem.repo_id,
            )
        return real, extra, dels

    def _landed(self, adds: Sequence[Upload], dels: Sequence[str]) -> Callable[[str], bool]:
        """Whether a commit holds exactly what ours wrote: every added file with our content (LFS
        sha256 or git blob id, never just the path), none of the deleted ones."""

        def check(commit: str) -> bool:
            files = self.client.list_files(self.rem.repo_id, commit)
            for path, src, sha in adds:
                rf = files.get(path)
                if isinstance(src, bytes):
                    if rf is None or rf.blob_id != git_blob_id(src):
                        return False
                elif sha is None or not _holds(self.ctx, rf, sha, src.stat().st_size):
                    return False
            return not any(p in files for p in dels)

        return check

    def _commit(self, parent: str, adds: list[Upload], dels: list[str], message: str) -> str:
        """One commit on ``parent``; on failure, check the head before retrying (it may have landed)."""
        client, rem = self.client, self.rem
        landed = self._landed(adds, dels)
        attempt = 0
        while True:
            try:
                commit = client.commit(
                    rem.repo_id,
                    adds=adds,
                    deletes=dels,
                    message=message,
                    branch=rem.revision,
                    parent_commit=parent,
                )
                self.ours.add(commit)
                return commit
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
                        f"may not have landed — run `libstore status` when the Hub is reachable",
                        repo_id=rem.repo_id,
                        status=e.status,
                    ) from e
                if now != parent:
                    if landed(now):
                        log.info("commit on %s landed although its answer was lost", rem.repo_id)
                        return now
                    raise RemoteMovedError(
                        f"{rem.repo_id} moved while this push was running (now at {now[:12]}); "
                        f"run `libstore pull {rem.name}` and push again",
                        repo_id=rem.repo_id,
                        status=e.status,
                    ) from e
                if attempt >= self.retries or not is_transient(e):
                    raise HubError(
                        f"{e}; nothing was pushed: the remote is still at {parent[:12]}",
                        repo_id=rem.repo_id,
                        status=e.status,
                    ) from e
                attempt += 1
                time.sleep(min(4.0, 0.5 * 2 ** (attempt - 1)))
