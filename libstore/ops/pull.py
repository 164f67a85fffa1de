"""Pull a library from its Hub remote: download only missing blobs (bounded in size and time), check
each against its sha256 before it enters the store, validate every expert and every prototype set
against the pulled weights, then apply everything in one transaction.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from libstore import config
from libstore.catalog import clusterings as clustering_repo
from libstore.catalog import derivations as derivation_repo
from libstore.catalog import prototypes as proto_repo
from libstore.catalog import remotes as remote_repo
from libstore.catalog import repo
from libstore.catalog.engine import Transaction
from libstore.errors import (
    BaseModelMismatchError,
    IntegrityError,
    LibstoreError,
    ValidationError,
)
from libstore.hub.client import HubClient, RemoteFile
from libstore.hub.manifest import MANIFEST_FILE, Manifest, PrototypeEntry, expert_repo_files, same_clustering
from libstore.hub.plan import ExpertPlan, plan, stale_sync_records
from libstore.ops.context import Context
from libstore.ops.sync_prototypes import check_pulled
from libstore.ops.sync_state import (
    DOWNLOAD_WORKERS,
    local_state,
    read_remote,
    select_experts,
    temp_dir,
)
from libstore.store import expert_data
from libstore.store.adapter import check_against_base, read_stored_adapter
from libstore.types import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Expert, ExpertQuery

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PullReport:
    """What a pull did.

    Attributes:
        remote, repo_id, revision: where it pulled from; ``commit`` the commit id read.
        files_downloaded, bytes_downloaded: blobs fetched from the remote.
        files_reused: blobs the store already had (not downloaded).
        added, updated, removed: expert names changed in the library.
        conflicts: experts changed on both sides, left alone (pull with ``force`` to take theirs).
        prototypes: prototype cache entries added (each checked against the pulled weights).
        prototypes_skipped: repo paths of prototype sets of a method or method version this
            libstore cannot check; not taken (they are computed here when needed).
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
    prototypes_skipped: tuple[str, ...] = ()
    clusterings: tuple[str, ...] = ()
    clusterings_skipped: tuple[str, ...] = ()
    experts: tuple[ExpertPlan, ...] = ()


@dataclass(frozen=True)
class PullOptions:
    """The options of ``libstore pull`` and ``Library.pull``: what to pull (``revision``, ``experts``),
    the token (never shown), and what to do with conflicts (``force``) and deletions (``prune``)."""

    revision: str | None = None
    experts: str | ExpertQuery | None = None
    token: str | None = field(default=None, repr=False)
    force: bool = False
    prune: bool = False


def pull(
    ctx: Context,
    remote: str | None = None,
    *,
    options: PullOptions,
    workers: int = DOWNLOAD_WORKERS,
) -> PullReport:
    """Pull the remote's experts (or those matching ``experts``) at a branch, tag or commit.

    ``force`` takes the remote's version of conflicting experts; ``prune`` removes experts here
    that were deleted on the remote (and not changed here) since the last sync.
    """
    revision, experts, token = options.revision, options.experts, options.token
    force, prune = options.force, options.prune
    with ctx.catalog.read() as s:
        rem = remote_repo.resolve_remote(s, remote)
    client = HubClient(token=token)
    rev = revision or rem.revision
    commit = client.resolve(rem.repo_id, rev)
    at_head = rev == rem.revision or commit == client.resolve(rem.repo_id, rem.revision)
    with temp_dir(ctx, "pull") as tmp:
        view = read_remote(client, rem.repo_id, commit, tmp)
        if view.manifest is None:
            raise ValidationError(
                f"{rem.repo_id}@{rev} has no {MANIFEST_FILE}, so it is not a libstore library; import a "
                f"single PEFT adapter with: libstore import-hub {rem.repo_id} [--subfolder PATH]"
            )
        manifest = view.manifest
        _check_remote_files(rem.repo_id, commit, manifest, view.files)
        with ctx.catalog.read() as s:
            synced = remote_repo.sync_state(s, rem.name)
            local = local_state(s)
        selection = select_experts(experts, manifest.experts, local.experts)
        remote_d = manifest.digests()
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
                    f"the remote's base model {base!r} ({rb.architecture}, fingerprint "
                    f"{rb.fingerprint[:12]}) "
                    f"is not this library's {base!r} ({lb.fingerprint[:12]}); nothing was pulled"
                )
        protos = _wanted_prototypes(
            ctx, manifest, set(fetch) | {p.name for p in plans if p.state == "in_sync" and p.selected}
        )
        needed: dict[str, tuple[str, int]] = {}  # sha256 -> (repo path, size)
        for e in entries:
            for path, f in expert_repo_files(e).items():
                needed.setdefault(f.sha256, (path, f.size))
        for p in protos:
            needed.setdefault(p.prototypes.blob_sha256, (p.path, p.prototypes.size))
        _check_sizes(rem.repo_id, needed)
        missing = {sha: v for sha, v in needed.items() if not ctx.blobs.claim(sha)}
        _download(ctx, client, rem.repo_id, commit, missing, tmp, workers)
        ctx.blobs.claim_all(needed)  # the downloads may have outlasted gc's grace period
        _validate_experts(ctx, entries, manifest)
        protos, skipped_protos = check_pulled(ctx, protos, manifest.experts)
        source = f"hf://{rem.repo_id}@{commit}"
        with ctx.catalog.write() as s:
            ctx.blobs.claim_all(needed)
            added, updated, new_clusterings, skipped_clusterings = _apply(
                s, manifest, entries, removes, protos, source
            )
            in_sync = [p.name for p in plans if p.state == "in_sync"]
            digests = {n: remote_d[n] for n in [*fetch, *in_sync]}
            forget = [*removes, *stale_sync_records(local_d, remote_d, synced)]
            remote_repo.record_sync(
                s, rem.name, commit=commit, digests=digests, forget=forget, last_commit=at_head
            )
    return PullReport(
        remote=rem.name,
        repo_id=rem.repo_id,
        revision=rev,
        commit=commit,
        files_downloaded=len(missing),
        bytes_downloaded=sum(size for _, size in missing.values()),
        files_reused=len(needed) - len(missing),
        added=tuple(added),
        updated=tuple(updated),
        removed=tuple(removes),
        conflicts=tuple(conflicts),
        prototypes=len(protos),
        prototypes_skipped=tuple(skipped_protos),
        clusterings=tuple(new_clusterings),
        clusterings_skipped=tuple(skipped_clusterings),
        experts=tuple(plans),
    )


def _wanted_prototypes(ctx: Context, m: Manifest, in_scope: set[str]) -> list[PrototypeEntry]:
    """Prototype sets of experts whose weights will equal the manifest's after this pull, that the
    library does not cache yet."""
    with ctx.catalog.read() as s:
        protos = [
            p
            for p in m.prototypes
            if p.expert in in_scope
            and not proto_repo.find_cached(
                s,
                [p.prototypes.expert_sha256],
                method=p.prototypes.method,
                method_version=p.prototypes.method_version,
                key=p.prototypes.params_key,
            )
        ]
    for p in protos:
        if proto_repo.params_key(p.prototypes.params) != p.prototypes.params_key:
            raise IntegrityError(
                f"{p.path}: its params_key does not match its params in the manifest; nothing was changed",
                path=p.path,
            )
    return protos


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
            f"{bad[0]}; the remote library is incomplete or inconsistent — nothing was changed",
            path=bad[0],
        )


def _check_sizes(repo_id: str, needed: Mapping[str, tuple[str, int]]) -> None:
    """Refuse, before any download, files bigger than ``$LIBSTORE_MAX_FILE_BYTES``."""
    limit = config.max_file_bytes()
    for path, size in sorted(needed.values()):
        if size > limit:
            raise ValidationError(
                f"{repo_id}: {path} is {size} bytes, over the {limit}-byte limit (LIBSTORE_MAX_FILE_BYTES); "
                f"nothing was downloaded. Raise the limit if the remote is right",
                path=path,
            )


def _download(
    ctx: Context,
    client: HubClient,
    repo_id: str,
    commit: str,
    missing: Mapping[str, tuple[str, int]],
    tmp: Path,
    workers: int,
) -> None:
    """Fetch blobs into the store, each bounded by its size and checked against its sha256;
    parallel, fail fast."""
    if not missing:
        return

    def one(sha: str, path: str, size: int) -> None:
        local = client.download(repo_id, path, commit, tmp / "dl", size=size)
        try:
            ctx.blobs.put_file(local, expected_sha256=sha)
        except IntegrityError as e:
            raise IntegrityError(
                f"{path} from {repo_id}@{commit[:12]} does not match its sha256 in the manifest "
                f"({e}); nothing was changed, pull again to resume",
                sha256=sha,
                path=path,
            ) from None
        finally:
            local.unlink(missing_ok=True)

    pool = cf.ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="libstore-pull")
    try:
        futures = [pool.submit(one, sha, path, size) for sha, (path, size) in sorted(missing.items())]
        for fut in cf.as_completed(futures):
            fut.result()
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _validate_experts(ctx: Context, entries: Sequence[Expert], m: Manifest) -> None:
    """Re-validate every pulled expert's stored files and check the manifest's claims against them."""
    for e in entries:
        files = {f.path: f for f in e.files}
        try:
            if ADAPTER_CONFIG not in files or ADAPTER_WEIGHTS not in files:
                raise ValidationError(f"it lacks {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS}")
            adapter = read_stored_adapter(
                ctx.blobs,
                files[ADAPTER_CONFIG].sha256,
                files[ADAPTER_WEIGHTS].sha256,
                where=f"experts/{e.name}",
            )
            expert_data.check_stored(ctx.blobs, e.files, where=f"experts/{e.name}")
        except LibstoreError as err:
            raise err.add_context(f"expert {e.name!r} from the remote") from None
        claims = {
            "rank": (e.rank, adapter.rank),
            "alpha": (e.alpha, adapter.alpha),
            "use_rslora": (e.use_rslora, adapter.use_rslora),
            "dtype": (e.dtype, adapter.dtype),
            "target_modules": (tuple(e.target_modules), tuple(adapter.target_modules)),
            "modules": (e.modules, adapter.modules),
        }
        for what, (said, real) in claims.items():
            if said != real:
                raise IntegrityError(
                    f"expert {e.name!r}: the manifest says {what}={str(said)[:80]} but its files say "
                    f"{str(real)[:80]}; the remote is inconsistent — nothing was changed",
                    path=f"experts/{e.name}",
                )
        # the base's identity is its fingerprint (checked before); shapes are checked here
        check_against_base(adapter, m.base_models[e.base_model], allow_base_mismatch=True)


def _apply(
    s: Transaction,
    m: Manifest,
    entries: Sequence[Expert],
    removes: Sequence[str],
    protos: Sequence[PrototypeEntry],
    source: str,
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Write a verified pull into the catalog (the caller's transaction)."""
    entry_bases = {e.base_model for e in entries}
    bases: set[str] = set()
    for name in sorted(entry_bases | {c.base_model for c in m.clusterings.values()}):
        rb = m.base_models[name]
        if name in entry_bases:  # registered from the remote's record: remember where it came from
            remote_repo.ensure_base(s, dataclasses.replace(rb, origin=source))
            bases.add(name)
        elif remote_repo.same_base(s, rb):
            bases.add(name)  # clusterings of bases this library has come along
    new_clusterings, skipped = [], []
    for name, c in sorted(m.clusterings.items()):
        if c.base_model not in bases:
            continue
        mine = clustering_repo.clustering_record(s, name)
        if mine is None:
            clustering_repo.insert_clustering(s, c)
            new_clusterings.append(name)
        elif not same_clustering(mine, c):
            skipped.append(name)
    added: list[str] = []
    updated: list[str] = []
    for e in entries:
        (updated if remote_repo.put_pulled_expert(s, e, source=source) else added).append(e.name)
    for e in entries:
        derivation_repo.set_derivation(s, e.name, e.lineage)
    for name in removes:
        if repo.expert_exists(s, name):
            repo.delete_expert(s, name)
    remote_repo.link_experts(s, [e.name for e in entries])
    for p in protos:
        ps = p.prototypes
        proto_repo.record(
            s,
            expert_sha256=ps.expert_sha256,
            method=ps.method,
            method_version=ps.method_version,
            params=dict(ps.params),
            blob_sha256=ps.blob_sha256,
            blob_size=ps.size,
        )
    return added, updated, new_clusterings, skipped
