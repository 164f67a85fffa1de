"""Pull a library from its Hub remote: download only missing blobs, check each against its sha256
before it enters the store, validate every expert, then apply everything in one transaction.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import shutil
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from libstore.catalog import clusterings as clustering_repo
from libstore.catalog import derivations as derivation_repo
from libstore.catalog import prototypes as proto_repo
from libstore.catalog import remotes as remote_repo
from libstore.catalog import repo
from libstore.catalog.models import BaseModelRow
from libstore.errors import (
    BaseModelMismatchError,
    IntegrityError,
    LibstoreError,
    ValidationError,
)
from libstore.hub.client import (
    HubClient,
    RemoteFile,
)
from libstore.hub.manifest import (
    MANIFEST_FILE,
    ExpertEntry,
    Manifest,
    PrototypeEntry,
)
from libstore.hub.plan import (
    plan,
    stale_sync_records,
)
from libstore.ops.context import Context
from libstore.ops.sync import (
    DOWNLOAD_WORKERS,
    PullReport,
    _base_model,
    _clustering_record,
    _local_state,
    _read_remote,
    _remote_name,
    _select,
    temp_dir,
)
from libstore.store.adapter import check_against_base, read_stored_adapter
from libstore.types import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    Derivation,
    DerivationParent,
    ExpertQuery,
    ModuleShape,
    StoredFile,
)

log = logging.getLogger(__name__)


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
                    f"the remote's base model {base!r} ({rb.architecture}, fingerprint "
                    f"{rb.fingerprint[:12]}) "
                    f"is not this library's {base!r} ({lb.fingerprint[:12]}); nothing was pulled"
                )
        # prototypes for experts whose weights will equal the manifest's after this pull
        in_scope = set(fetch) | {p.name for p in plans if p.state == "in_sync" and p.selected}
        with ctx.catalog.read() as s:
            protos = [
                p
                for p in manifest.prototypes
                if p.expert in in_scope
                and not proto_repo.find_cached(
                    s, [p.expert_sha256], method=p.method, method_version=p.method_version, key=p.params_key
                )
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
        missing = {sha: v for sha, v in needed.items() if not ctx.blobs.claim(sha)}
        _download(ctx, client, rem.repo_id, commit, missing, tmp, workers)
        ctx.blobs.claim_all(needed)  # the downloads may have outlasted gc's grace period
        _validate_experts(ctx, entries, manifest)
        source = f"hf://{rem.repo_id}@{commit}"
        with ctx.catalog.write() as s:
            ctx.blobs.claim_all(needed)
            added, updated, new_clusterings, skipped_clusterings = _apply(
                s,
                manifest,
                entries,
                removes,
                protos,
                source,
            )
            row = remote_repo.remote_row(s, rem.name)
            in_sync = [p.name for p in plans if p.state == "in_sync"]
            digests = {n: remote_d[n] for n in [*fetch, *in_sync]}
            forget = [*removes, *stale_sync_records(local_d, remote_d, synced)]
            remote_repo.record_sync(
                s, row, commit=commit, digests=digests, forget=forget, last_commit=at_head
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
        clusterings=tuple(new_clusterings),
        clusterings_skipped=tuple(skipped_clusterings),
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
    ctx: Context,
    client: HubClient,
    repo_id: str,
    commit: str,
    missing: Mapping[str, tuple[str, int]],
    tmp: Path,
    workers: int,
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


def _validate_experts(ctx: Context, entries: Sequence[ExpertEntry], m: Manifest) -> None:
    """Re-validate every pulled expert's PEFT folder and check the manifest's claims against it."""
    for e in entries:
        try:
            if ADAPTER_CONFIG not in e.files or ADAPTER_WEIGHTS not in e.files:
                raise ValidationError(f"it lacks {ADAPTER_CONFIG} or {ADAPTER_WEIGHTS}")
            adapter = read_stored_adapter(
                ctx.blobs,
                e.files[ADAPTER_CONFIG].sha256,
                e.files[ADAPTER_WEIGHTS].sha256,
                where=f"experts/{e.name}",
            )
        except LibstoreError as err:
            raise err.add_context(f"expert {e.name!r} from the remote") from None
        claims = {
            "rank": (e.rank, adapter.rank),
            "alpha": (e.alpha, adapter.alpha),
            "use_rslora": (e.use_rslora, adapter.use_rslora),
            "dtype": (e.dtype, adapter.dtype),
            "target_modules": (tuple(e.target_modules), tuple(adapter.target_modules)),
            "modules": (
                {k: tuple(v) for k, v in e.modules.items()},
                {k: (s.in_features, s.out_features, s.rank) for k, s in adapter.modules.items()},
            ),
        }
        for what, (said, real) in claims.items():
            if said != real:
                raise IntegrityError(
                    f"expert {e.name!r}: the manifest says {what}={str(said)[:80]} but its files say "
                    f"{str(real)[:80]}; the remote is inconsistent — nothing was changed"
                )
        # the base's identity is its fingerprint (checked before); shapes are checked here
        check_against_base(adapter, _base_model(m.base_models[e.base_model]), allow_base_mismatch=True)


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
        mine = clustering_repo.clustering_record(s, name)
        data = _clustering_record(c)
        if mine is None:
            clustering_repo.insert_clustering(s, data)
            new_clusterings.append(name)
        elif dataclasses.replace(mine, created_at=None) != data:
            skipped.append(name)
    added, updated = [], []
    for e in entries:
        base_row = bases[e.base_model]
        files = [StoredFile(fname, f.sha256, f.size) for fname, f in sorted(e.files.items())]
        cid = clustering_repo.cluster_id(s, e.cluster)
        modules = {k: ModuleShape(*v) for k, v in e.modules.items()}
        if repo.expert_exists(s, e.name):
            row = repo.expert_row(s, e.name)
            repo.replace_files(
                s,
                row,
                files,
                ADAPTER_WEIGHTS,
                kind=e.kind,
                base_model=base_row,
                rank=e.rank,
                alpha=e.alpha,
                use_rslora=e.use_rslora,
                target_modules=list(e.target_modules),
                module_shapes={k: [v.in_features, v.out_features, v.rank] for k, v in modules.items()},
                dtype=e.dtype,
                extra=dict(e.metadata),
                cluster_id=cid,
                source=source,
            )
            row.tasks = [repo.task_row(s, t) for t in e.tasks]
            row.tags = [repo.tag_row(s, t) for t in e.tags]
            updated.append(e.name)
        else:
            row = repo.insert_expert(
                s,
                name=e.name,
                kind=e.kind,
                base=base_row,
                rank=e.rank,
                alpha=e.alpha,
                use_rslora=e.use_rslora,
                target_modules=e.target_modules,
                modules=modules,
                dtype=e.dtype,
                files=files,
                weights_file=ADAPTER_WEIGHTS,
                source=source,
                metadata=dict(e.metadata),
                tasks=e.tasks,
                tags=e.tags,
                cluster_id=cid,
            )
            added.append(e.name)
        s.flush()
    for e in entries:
        d = e.derivation
        derivation_repo.set_derivation(
            s,
            e.name,
            None
            if d is None
            else Derivation(
                method=d.method,
                method_version=d.method_version,
                params=dict(d.params),
                inputs_key=d.inputs_key,
                parents=tuple(DerivationParent(*p) for p in d.parents),
            ),
        )
    for name in removes:
        if repo.expert_exists(s, name):
            repo.delete_expert(s, name)
    remote_repo.link_experts(s, [e.name for e in entries])
    for p in protos:
        proto_repo.record(
            s,
            expert_sha256=p.expert_sha256,
            method=p.method,
            method_version=p.method_version,
            params=dict(p.params),
            blob_sha256=p.sha256,
            blob_size=p.size,
        )
    return added, updated, new_clusterings, skipped
