"""What push, pull and status share: the library's records as a manifest would hold them, the remote's
head read and checked, the choice of experts, and the temp folders downloads go to.

The library side (:func:`local_state`) and the remote side (:func:`read_remote`) are both given as
the shared records of :mod:`libstore.types`, so the sync planner compares like with like (record
digests, :func:`libstore.hub.manifest.record_digest`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from libstore.catalog import clusterings as clustering_repo
from libstore.catalog import prototypes as proto_repo
from libstore.catalog import repo
from libstore.catalog.engine import Transaction
from libstore.errors import HubError, IntegrityError, NotFoundError, ValidationError
from libstore.hub.client import HubClient, RemoteFile, git_blob_id
from libstore.hub.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, Manifest, record_digest
from libstore.hub.manifest_reader import parse_manifest
from libstore.hub.plan import matches
from libstore.ops.context import Context
from libstore.ops.query import parse_query
from libstore.store.expert_data import check_files
from libstore.types import (
    BaseModel,
    ClusteringRecord,
    Expert,
    ExpertQuery,
    PrototypeSet,
    Remote,
)

#: Temp folders of syncs and imports, inside the library (same filesystem as the blob store).
TMP_DIR = ".tmp"
DOWNLOAD_WORKERS = 8
COMMIT_RETRIES = 2


# --- temp folders --------------------------------------------------------------------------------


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


# --- the library's side --------------------------------------------------------------------------


@dataclass
class LocalState:
    """The library as a manifest would hold it.

    Attributes:
        experts: name -> record, with its ``lineage``.
        bases, clusterings: by name.
        prototypes: expert weights sha256 -> the cached sets of those weights.
    """

    experts: dict[str, Expert]
    bases: dict[str, BaseModel]
    clusterings: dict[str, ClusteringRecord]
    prototypes: dict[str, list[PrototypeSet]]

    def digests(self) -> dict[str, str]:
        return {n: record_digest(e) for n, e in self.experts.items()}


def local_state(s: Transaction) -> LocalState:
    """Everything of the library that travels, read in the caller's (read) transaction."""
    experts = {}
    for e in repo.find_experts(s, ExpertQuery(), with_lineage=True):
        try:
            check_files((f.path for f in e.files), where=f"expert {e.name!r}")
        except ValidationError as err:
            raise ValidationError(f"{err.message}; such an expert cannot be synced") from None
        experts[e.name] = e
    protos: dict[str, list[PrototypeSet]] = {}
    for c in proto_repo.entries(s):
        protos.setdefault(c.expert_sha256, []).append(c)
    return LocalState(
        experts=experts,
        bases={b.name: b for b in repo.list_bases(s)},
        clusterings={c.name: c for c in clustering_repo.clustering_records(s)},
        prototypes=protos,
    )


def select_experts(query: str | ExpertQuery | None, *sides: Mapping[str, Expert]) -> set[str] | None:
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
        raise NotFoundError(
            f"no expert matches {query!r} here or on the remote", what="expert", name=str(query)
        )
    return names


# --- the remote's side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RemoteView:
    """One commit of a remote: its files and its manifest (``None``: no commit / no manifest)."""

    head: str | None
    files: dict[str, RemoteFile]
    manifest: Manifest | None
    manifest_blob: str | None


def read_remote(client: HubClient, repo_id: str, commit: str | None, tmp: Path) -> RemoteView:
    """List ``commit`` and read its manifest, checked against the listing's size and blob id."""
    if commit is None:
        return RemoteView(None, {}, None, None)
    files = client.list_files(repo_id, commit)
    mf = files.get(MANIFEST_FILE)
    if mf is None:
        return RemoteView(commit, files, None, None)
    if mf.size > MAX_MANIFEST_BYTES:
        raise ValidationError(f"{repo_id}@{commit[:12]}: {MANIFEST_FILE} is {mf.size} bytes, over the limit")
    data = client.read_small(repo_id, MANIFEST_FILE, commit, tmp / "manifest", size=mf.size)
    if (mf.sha256 is None and git_blob_id(data) != mf.blob_id) or len(data) != mf.size:
        raise IntegrityError(
            f"{MANIFEST_FILE} of {repo_id}@{commit[:12]} arrived corrupted (its hash differs from the "
            f"repo's record); nothing was changed — try again",
            path=MANIFEST_FILE,
        )
    manifest = parse_manifest(data, source=f"{repo_id}@{commit[:12]}:{MANIFEST_FILE}")
    return RemoteView(commit, files, manifest, mf.blob_id)


def why_remote_moved(client: HubClient, remote: Remote, view: RemoteView) -> str | None:
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


def head_or_none(client: HubClient, rem: Remote) -> str | None:
    """The commit the remote's branch points at; ``None`` if the repo does not exist yet."""
    if not client.repo_exists(rem.repo_id):
        if rem.last_commit is not None:
            raise HubError(
                f"remote {rem.name}: repo {rem.repo_id} no longer exists (or this token cannot see it); "
                f"last synced at {rem.last_commit[:12]}",
                repo_id=rem.repo_id,
                status=404,
            )
        return None
    return client.resolve(rem.repo_id, rem.revision)
