"""Issue 6 end to end: push, pull and status between two libraries through the real
``huggingface_hub`` client and the Hub stand-in (tests/hubserver.py)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.torch import load_file

from libstore import Library
from libstore.catalog import clusterings as clustering_repo
from libstore.errors import (
    AlreadyExistsError,
    HubError,
    IntegrityError,
    NotFoundError,
    RemoteMovedError,
    SyncConflictError,
)
from libstore.hub.manifest import MANIFEST_FILE, ManifestError
from libstore.ops import pull, push
from libstore.ops.sync import StatusReport
from libstore.store.blobs import sha256_file
from libstore.types import ClusteringInput, ClusteringRecord, ClusterRecord, Remote
from tests import hub_support as support
from tests.factories import load_base, make_adapter
from tests.hub_support import REPO, add_experts, snapshot
from tests.hubserver import DEFAULT_TOKEN, HubServer

hub, other = support.hub, support.other  # fixtures

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
#: The main round trips run on SQLite and PostgreSQL; the rest on SQLite only (time budget).
SQLITE_ONLY = pytest.mark.parametrize("db_url", [None], ids=["sqlite"])


def _lineage(lib: Library, name: str) -> tuple:
    e = lib.get(name)
    lin = e.lineage
    return (lin.method, lin.method_version, lin.params, lin.inputs_key, lin.parents) if lin else None


def _records(lib: Library) -> dict:
    """Everything that should travel, comparable between two libraries."""
    experts = {
        e.name: (
            e.kind,
            e.sha256,
            e.tasks,
            e.tags,
            e.cluster,
            e.rank,
            e.alpha,
            e.metadata,
            tuple(sorted((f.path, f.sha256) for f in e.files)),
            _lineage(lib, e.name),
        )
        for e in lib.experts()
    }
    protos = sorted(
        (p.expert_sha256, p.method, p.method_version, p.params_key, p.blob_sha256)
        for p in lib.prototype_cache()
    )
    with lib.context.catalog.read() as s:  # as recorded; when is local to each library
        clusterings = [dataclasses.replace(c, created_at=None) for c in clustering_repo.clustering_records(s)]
    return {"experts": experts, "prototypes": protos, "clusterings": clusterings}


def test_round_trip_between_two_libraries(
    library: Library, other: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    """Experts, tags, tasks, metadata, derivations, clusterings and prototypes travel; a pulled
    expert loads with plain PEFT straight from the server."""
    add_experts(library, base_dir, tmp_path, ["arc", "boolq"])
    for i, g in enumerate(["wiki_en", "wiki_fr"]):
        folder = make_adapter(base_dir, tmp_path / "src" / g, seed=50 + i)
        library.add(folder, name=g, kind="general", tags=["general"])
    library.tag("arc", "v2")
    library.subtract_general(general=["wiki_en", "wiki_fr"], experts=["arc"])
    with library.context.catalog.write() as s:
        clustering_repo.insert_clustering(
            s,
            ClusteringRecord(
                name="mbc-k2",
                base_model="tiny",
                method="mbc",
                metric="cosine",
                k=2,
                seed=0,
                params={"top": 0.2},
                criterion={"silhouette": 0.5},
                query="kind=task",
                inputs=(
                    ClusteringInput("arc", library.get("arc").sha256),
                    ClusteringInput("boolq", library.get("boolq").sha256),
                ),
                clusters=(
                    ClusterRecord(0, ("arc",), ("arc",), "c0", {"n": 1}),
                    ClusterRecord(1, ("boolq",), ("boolq",), None, {}),
                ),
            ),
        )
    library.add(
        make_adapter(base_dir, tmp_path / "src" / "c0", seed=70),
        name="cluster0",
        kind="cluster",
        cluster="mbc-k2:0",
    )
    library.compute_prototypes("kind=task,residual")
    want = _records(library)
    assert want["prototypes"] and any(v[9] for v in want["experts"].values())

    library.add_remote("origin", REPO, private=True)
    pushed = library.push(message="first library", tag="v1")
    assert pushed.commit == hub.head(REPO) and pushed.commits == 1 and pushed.tag == "v1"
    assert set(pushed.uploaded) == set(want["experts"]) and pushed.prototypes == len(want["prototypes"])
    manifest = json.loads(hub.read_file(REPO, MANIFEST_FILE))
    assert set(manifest["experts"]) == set(want["experts"])
    assert manifest["experts"]["arc_res"]["derivation"]["method"]
    assert b"PeftModel.from_pretrained" in hub.read_file(REPO, "README.md")

    other.add_remote("origin", REPO)
    pulled = other.pull()
    assert set(pulled.added) == set(want["experts"]) and pulled.conflicts == ()
    assert pulled.prototypes == len(want["prototypes"]) and pulled.clusterings == ("mbc-k2",)
    assert _records(other) == want
    lineage = other.lineage("arc_res")  # derivation links resolve to the pulled parents, not stale
    assert lineage.derivation is not None and not lineage.is_stale
    assert {p.status for p in lineage.derivation.parents} == {"ok"}
    for lib in (library, other):
        st = lib.status()
        assert st.counts == {"in_sync": len(want["experts"])} and not st.remote_moved
    assert [r.last_commit for r in other.remotes()] == [pushed.commit]

    # the pulled expert equals the original, and loads with plain PEFT from the server
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_base(base_dir), REPO, subfolder="experts/arc")
    src = load_file(other.context.blobs.path(other.get("arc").file("adapter_model.safetensors").sha256))
    for key, value in src.items():
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        part = "lora_A" if ".lora_A." in key else "lora_B"
        got = getattr(model.base_model.model.get_submodule(module), part)["default"].weight
        assert torch.equal(got, value)


def test_incremental_push_and_pull_move_only_the_changed_expert(
    library: Library,
    other: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    names = [f"e{i}" for i in range(6)]
    add_experts(library, base_dir, tmp_path, names)
    library.add_remote("origin", REPO)
    other.add_remote("origin", REPO)
    library.push()
    other.pull()

    # nothing changed: no commit at all
    hub.reset_stats()
    again = library.push()
    assert again.commits == 0 and hub.counts["commit"] == 0 and hub.counts["lfs_upload"] == 0

    # change one expert's weights: only its weights, the manifest and the card go up
    library.remove("e3")
    add_experts(library, base_dir, tmp_path, ["e3"], seed0=99)
    st = library.status()
    assert [(p.name, p.state, p.push) for p in st.experts if p.state != "in_sync"] == [
        ("e3", "local_changed", "upload")
    ]
    hub.reset_stats()
    r = library.push()
    assert r.uploaded == ("e3",) and r.commits == 1
    assert hub.counts["lfs_upload"] == 1 and hub.counts["lfsFile"] == 1  # the weights only
    assert r.files_uploaded == 3  # weights + libstore.json + README.md (the config is unchanged)

    hub.reset_stats()
    p = other.pull()
    assert p.updated == ("e3",) and p.added == () and p.files_downloaded == 1 and p.files_reused == 1
    assert hub.counts["download"] == 2  # the manifest + the new weights
    assert other.get("e3").sha256 == library.get("e3").sha256

    # a metadata-only change travels without any file but the manifest
    library.tag("e1", "gold")
    hub.reset_stats()
    assert library.push().uploaded == ("e1",) and hub.counts["lfs_upload"] == 0
    hub.reset_stats()
    p = other.pull()
    assert p.updated == ("e1",) and p.files_downloaded == 0 and "gold" in other.get("e1").tags

    # a renamed expert: the Hub already holds its bytes (LFS dedup by sha256), nothing is re-sent
    library.rename("e0", "e0_v2")
    hub.reset_stats()
    r = library.push(prune=True)
    assert r.uploaded == ("e0_v2",) and r.deleted == ("e0",) and hub.counts["lfs_upload"] == 0
    hub.reset_stats()
    assert other.pull(prune=True).added == ("e0_v2",) and hub.counts["download"] == 1  # manifest only


@SQLITE_ONLY
def test_pull_by_tag_branch_and_commit(
    library: Library, other: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    add_experts(library, base_dir, tmp_path, ["a", "b"])
    library.add_remote("origin", REPO)
    v1 = library.push(tag="v1").commit
    sha_v1 = library.get("a").sha256
    library.remove("a")
    add_experts(library, base_dir, tmp_path, ["a"], seed0=40)
    add_experts(library, base_dir, tmp_path, ["c"], seed0=41)
    v2 = library.push().commit
    HfApi(endpoint=hub.url, token=DEFAULT_TOKEN).create_branch(REPO, branch="dev", revision=v1)

    other.add_remote("origin", REPO)
    r = other.pull(revision="v1")
    assert r.commit == v1 and sorted(r.added) == ["a", "b"] and other.get("a").sha256 == sha_v1
    assert other.remotes()[0].last_commit is None  # an old tag is not the branch head
    assert other.pull(revision="dev").commit == v1
    r = other.pull(revision=v2)  # by commit id
    assert r.updated == ("a",) and r.added == ("c",)
    assert other.get("a").sha256 == library.get("a").sha256
    assert other.pull(revision=v1[:12]).updated == ("a",)  # a short commit id works too
    assert other.pull().commit == v2 and other.status().counts == {"in_sync": 3}
    with pytest.raises(HubError, match="no branch, tag or commit"):
        other.pull(revision="nope")


def test_remote_moved_refuses_push_and_conflicts_are_reported(
    library: Library,
    other: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    add_experts(library, base_dir, tmp_path, ["a", "b", "c"])
    library.add_remote("origin", REPO)
    library.push()
    other.add_remote("origin", REPO)
    other.pull()

    other.tag("a", "theirs")
    other.push()
    library.tag("b", "ours")
    head = hub.head(REPO)
    with pytest.raises(RemoteMovedError, match="pull"):
        library.push()
    assert hub.head(REPO) == head

    # the remote moved on other experts: pull merges cleanly, then push works
    st = library.status()
    assert st.remote_moved and {p.name: p.state for p in st.experts if p.state != "in_sync"} == {
        "a": "remote_changed",
        "b": "local_changed",
    }
    assert library.pull().updated == ("a",)
    assert "ours" in library.get("b").tags and "theirs" in library.get("a").tags
    library.push()
    assert other.pull().updated == ("b",)

    # both sides change one expert: reported, never silently overwritten
    library.tag("c", "mine")
    other.untag("c", "v1")
    other.push()
    r = library.pull()
    assert r.conflicts == ("c",) and r.updated == ()
    assert "mine" in library.get("c").tags
    with pytest.raises(SyncConflictError, match="--force"):
        library.push()
    r = library.pull(force=True)
    assert r.updated == ("c",) and library.get("c").tags == ()
    assert library.status().counts == {"in_sync": 3}


@SQLITE_ONLY
def test_deletions_travel_only_with_prune(
    library: Library, other: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    add_experts(library, base_dir, tmp_path, ["a", "b"])
    library.add_remote("origin", REPO)
    library.push()
    other.add_remote("origin", REPO)
    other.pull()
    library.remove("b")
    assert library.push().deleted == ()
    assert {p.name: (p.state, p.push) for p in library.status().experts}["b"] == ("deleted_local", "none")
    r = library.push(prune=True)
    assert r.deleted == ("b",) and r.files_deleted == 2
    assert "experts/b/adapter_model.safetensors" not in HfApi(endpoint=hub.url).list_repo_files(REPO)
    assert other.pull().removed == () and "b" in [e.name for e in other.experts()]
    assert other.pull(prune=True).removed == ("b",) and [e.name for e in other.experts()] == ["a"]


@SQLITE_ONLY
def test_push_to_a_new_branch(library: Library, hub: HubServer, base_dir: Path, tmp_path: Path) -> None:
    add_experts(library, base_dir, tmp_path, ["a"])
    library.add_remote("staging", REPO, revision="dev")
    r = library.push("staging")
    assert r.branch == "dev" and hub.head(REPO, "dev") == r.commit != hub.head(REPO, "main")
    assert library.status("staging").counts == {"in_sync": 1}


@SQLITE_ONLY
def test_push_selected_experts(library: Library, hub: HubServer, base_dir: Path, tmp_path: Path) -> None:
    add_experts(library, base_dir, tmp_path, ["arc_easy", "arc_hard", "boolq"])
    library.add_remote("origin", REPO)
    r = library.push(experts="arc_*")
    assert r.uploaded == ("arc_easy", "arc_hard")
    assert set(json.loads(hub.read_file(REPO, MANIFEST_FILE))["experts"]) == {"arc_easy", "arc_hard"}
    assert library.push().uploaded == ("boolq",)


# --- faults: each against its guarantee ------------------------------------------------------------


def _setup_pushed(library: Library, base_dir: Path, tmp_path: Path, names: list[str]) -> str:
    add_experts(library, base_dir, tmp_path, names)
    library.add_remote("origin", REPO)
    return library.push().commit


@SQLITE_ONLY
def test_failed_lfs_upload_leaves_remote_and_library_unchanged(
    library: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(push.time, "sleep", lambda s: None)
    head = _setup_pushed(library, base_dir, tmp_path, ["a"])
    add_experts(library, base_dir, tmp_path, ["b"], seed0=5)
    before = snapshot(library)
    hub.faults.fail_next("lfs_upload", 500, count=None)
    with pytest.raises(HubError):
        library.push()
    assert hub.head(REPO) == head and snapshot(library) == before
    hub.faults.clear()
    assert library.push().uploaded == ("b",)


@SQLITE_ONLY
def test_5xx_on_commit_leaves_remote_at_previous_commit(
    library: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(push.time, "sleep", lambda s: None)
    head = _setup_pushed(library, base_dir, tmp_path, ["a"])
    add_experts(library, base_dir, tmp_path, ["b"], seed0=5)
    before = snapshot(library)
    hub.faults.fail_next("commit", 500, count=None)
    with pytest.raises(HubError, match="still at"):
        library.push()
    assert hub.head(REPO) == head and snapshot(library) == before
    hub.faults.clear()
    hub.faults.fail_next("commit", 503, count=1)  # a transient failure is retried after a head check
    hub.reset_stats()
    r = library.push()
    assert r.uploaded == ("b",) and hub.counts["commit"] == 2 and r.commit == hub.head(REPO)


@SQLITE_ONLY
def test_commit_applied_but_answer_lost_counts_as_pushed(
    library: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    head = _setup_pushed(library, base_dir, tmp_path, ["a"])
    add_experts(library, base_dir, tmp_path, ["b"], seed0=5)
    hub.faults.commit_succeeds_but_times_out()
    hub.reset_stats()
    r = library.push()
    assert r.commit == hub.head(REPO) != head and hub.counts["commit"] == 1  # checked, not re-sent
    assert library.remotes()[0].last_commit == r.commit
    assert library.status().counts == {"in_sync": 2}
    assert library.push().commits == 0


@SQLITE_ONLY
def test_interrupted_batched_push_keeps_manifest_consistent_and_resumes(
    library: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    head = _setup_pushed(library, base_dir, tmp_path, ["a"])
    old_manifest = hub.read_file(REPO, MANIFEST_FILE)
    add_experts(library, base_dir, tmp_path, [f"n{i}" for i in range(6)], seed0=10)
    real = push.HubClient.commit
    calls = []

    def failing_last(self, repo_id, **kw):  # the batches land, the manifest commit fails
        calls.append(kw["message"])
        if any(p == MANIFEST_FILE for p, _, _ in kw["adds"]):
            raise HubError("injected: connection reset")
        return real(self, repo_id, **kw)

    monkeypatch.setattr(push.HubClient, "commit", failing_last)
    with pytest.raises(HubError):
        push.push(library.context, options=push.PushOptions(), max_files_per_commit=4, retries=0)
    assert len(calls) == 3 + 1  # 12 files in batches of 4, then the manifest commit (failed)
    assert hub.head(REPO) != head and hub.read_file(REPO, MANIFEST_FILE) == old_manifest
    assert library.remotes()[0].last_commit == head
    monkeypatch.setattr(push.HubClient, "commit", real)
    hub.reset_stats()
    r = push.push(library.context, options=push.PushOptions(), max_files_per_commit=4)
    assert hub.counts["lfs_upload"] == 0 and r.commits == 1  # files already there: manifest only
    manifest = json.loads(hub.read_file(REPO, MANIFEST_FILE))
    assert len(manifest["experts"]) == 7


@SQLITE_ONLY
def test_two_libraries_pushing_at_once_never_drop_each_others_experts(
    library: Library,
    other: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    """A batched push whose first commit lands but answers 502; while it waits for that answer the
    other library pushes its own expert. The first push must not then write its stale manifest."""
    _setup_pushed(library, base_dir, tmp_path, ["shared"])
    other.add_remote("origin", REPO)
    other.pull()
    add_experts(library, base_dir, tmp_path, ["mine"], seed0=10)
    add_experts(other, base_dir, tmp_path, ["theirs"], seed0=20)
    pause = hub.faults.fail_next("commit", 502, after_apply=True, hold=True)
    assert pause is not None
    errors: list[BaseException] = []

    def first() -> None:
        try:  # 2 files + manifest + card > 3: the files go in a commit of their own first
            push.push(library.context, options=push.PushOptions(), max_files_per_commit=3)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=first)
    thread.start()
    assert pause.reached.wait(30)  # the files of "mine" are committed; the answer is held
    assert other.push().uploaded == ("theirs",)
    pause.release.set()
    thread.join(60)
    assert len(errors) == 1 and isinstance(errors[0], RemoteMovedError), errors
    assert errors[0].repo_id == REPO
    assert set(json.loads(hub.read_file(REPO, MANIFEST_FILE))["experts"]) == {"shared", "theirs"}
    assert library.remotes()[0].last_commit != hub.head(REPO)  # the failed push recorded nothing

    assert library.pull().added == ("theirs",)
    hub.reset_stats()
    assert library.push().uploaded == ("mine",) and hub.counts["lfs_upload"] == 0  # files were there
    assert set(json.loads(hub.read_file(REPO, MANIFEST_FILE))["experts"]) == {"mine", "shared", "theirs"}
    r = other.pull(prune=True)
    assert r.removed == () and r.added == ("mine",)
    assert sorted(e.name for e in other.experts()) == ["mine", "shared", "theirs"]
    assert other.verify().ok and library.verify().ok


@SQLITE_ONLY
def test_cut_download_leaves_library_unchanged_and_next_pull_resumes(
    library: Library,
    other: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    _setup_pushed(library, base_dir, tmp_path, ["a", "b", "c"])
    blobs = sorted({f.sha256 for e in library.experts() for f in e.files})  # download order, 1 worker
    last = (
        next(e.name for e in library.experts() if e.file("adapter_model.safetensors").sha256 == blobs[-1])
        if any(e.file("adapter_model.safetensors").sha256 == blobs[-1] for e in library.experts())
        else None
    )
    assert last is not None or len(blobs) == 4
    cut = last or "a"
    other.add_remote("origin", REPO)
    before = snapshot(other)
    hub.faults.cut_download(f"experts/{cut}/adapter_model.safetensors", 100, count=None)
    with pytest.raises(HubError):
        pull.pull(other.context, options=pull.PullOptions(), workers=1)
    assert snapshot(other) == before
    stored = set(other.context.blobs)
    assert library.get(cut).sha256 not in stored
    hub.faults.clear()
    hub.reset_stats()
    r = other.pull()
    assert r.files_reused == len(stored) and r.files_downloaded == len(blobs) - len(stored)
    assert hub.counts["download"] == 1 + r.files_downloaded
    assert sorted(e.name for e in other.experts()) == ["a", "b", "c"]


@SQLITE_ONLY
def test_wrong_bytes_are_refused_before_they_enter_the_store(
    library: Library,
    other: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    _setup_pushed(library, base_dir, tmp_path, ["a"])
    weights = library.get("a").file("adapter_model.safetensors").sha256
    other.add_remote("origin", REPO)
    before = snapshot(other)
    hub.faults.wrong_bytes("experts/a/adapter_model.safetensors")
    with pytest.raises(IntegrityError, match="sha256"):
        other.pull()
    assert snapshot(other) == before and weights not in other.context.blobs
    assert not list((other.path / ".tmp").glob("*"))  # temp downloads cleaned up
    hub.faults.clear()
    assert other.pull().added == ("a",)


# --- hostile remotes -------------------------------------------------------------------------------


def _commit_manifest(hub: HubServer, manifest: dict, extra: dict[str, bytes] | None = None) -> None:
    ops = [CommitOperationAdd(MANIFEST_FILE, json.dumps(manifest).encode())]
    ops += [CommitOperationAdd(p, b) for p, b in (extra or {}).items()]
    HfApi(endpoint=hub.url, token=DEFAULT_TOKEN).create_commit(REPO, ops, commit_message="tamper")


@pytest.mark.parametrize(
    "tamper, error, match",
    [
        (lambda m: m["experts"].__setitem__("../evil", m["experts"]["a"]), ManifestError, "invalid name"),
        (
            lambda m: m["experts"]["a"]["files"].__setitem__("../../x.py", {"sha256": "0" * 64, "size": 1}),
            ManifestError,
            "unknown file",
        ),
        (
            lambda m: m["experts"]["a"]["files"]["adapter_model.safetensors"].__setitem__(
                "path", "../../etc/x"
            ),
            ManifestError,
            "is not",
        ),
        (
            lambda m: m["experts"]["a"]["files"]["adapter_config.json"].__setitem__("sha256", "ABC"),
            ManifestError,
            "sha256",
        ),
        (lambda m: m["experts"]["a"].__setitem__("kind", "rootkit"), ManifestError, "kind"),
        (lambda m: m.__setitem__("format_version", 99), ManifestError, "upgrade libstore"),
        (
            lambda m: m["experts"].__setitem__(
                "ghost",
                {
                    **m["experts"]["a"],
                    "files": {
                        "adapter_config.json": m["experts"]["a"]["files"]["adapter_config.json"],
                        "adapter_model.safetensors": {"sha256": "1" * 64, "size": 10},
                    },
                },
            ),
            IntegrityError,
            "missing",
        ),
        (
            lambda m: (
                m["experts"]["a"].__setitem__("rank", 8)
                or m["experts"]["a"].__setitem__(
                    "modules", {k: [v[0], v[1], 8] for k, v in m["experts"]["a"]["modules"].items()}
                )
            ),
            IntegrityError,
            "manifest says rank",
        ),
    ],
)
@SQLITE_ONLY
def test_hostile_manifest_is_refused_and_nothing_changes(
    library: Library,
    other: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
    tamper,
    error,
    match,
) -> None:
    _setup_pushed(library, base_dir, tmp_path, ["a"])
    manifest = json.loads(hub.read_file(REPO, MANIFEST_FILE))
    tamper(manifest)
    _commit_manifest(hub, manifest)
    other.add_remote("origin", REPO)
    before = snapshot(other)
    with pytest.raises(error, match=match):
        other.pull()
    assert snapshot(other) == before
    assert not any(p.name == "evil" or p.suffix == ".py" for p in tmp_path.rglob("*"))


@SQLITE_ONLY
def test_repo_without_manifest_is_not_a_library(other: Library, hub: HubServer) -> None:
    api = HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)
    api.create_repo(REPO)
    other.add_remote("origin", REPO)
    with pytest.raises(Exception, match="import-hub"):
        other.pull()


# --- secrets ---------------------------------------------------------------------------------------


SECRET = "hf_TopSecretToken_0123456789abcdef"


def test_token_never_leaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import traceback

    from tests.hubserver import patch_hf_client, skip_client_backoff

    caplog.set_level(logging.DEBUG)
    with HubServer(token=SECRET) as server:
        patch_hf_client(monkeypatch, server.url, tmp_path / "hf", token="hf_wrong_token")
        monkeypatch.delenv("HF_TOKEN")
        skip_client_backoff(monkeypatch)
        monkeypatch.setattr(push.time, "sleep", lambda s: None)
        lib = Library.init(tmp_path / "lib")
        lib.add_base("tiny", str(base_dir))
        add_experts(lib, base_dir, tmp_path, ["a"])
        lib.add_remote("origin", REPO, private=True)
        errors = []
        with pytest.raises(HubError) as bad:
            lib.push(token=SECRET[:-1] + "X")  # a wrong token
        errors.append(bad.value)
        r = lib.push(token=SECRET)
        assert r.commits == 1
        server.faults.fail_next("commit", 500, count=None)
        add_experts(lib, base_dir, tmp_path, ["b"], seed0=3)
        with pytest.raises(HubError) as failed:
            lib.push(token=SECRET)
        errors.append(failed.value)
        monkeypatch.setenv("HF_TOKEN", SECRET)
        server.faults.clear()
        server.faults.fail_next("download", 500, count=None)
        other = Library.init(tmp_path / "other")
        other.add_remote("origin", REPO)
        with pytest.raises(HubError) as failed_pull:
            other.pull()
        errors.append(failed_pull.value)
        lib.close()
        other.close()
        texts = ["".join(traceback.format_exception(e)) for e in errors]
        texts.append(caplog.text)
        texts.append(server.read_file(REPO, MANIFEST_FILE).decode())
        texts.append(server.read_file(REPO, "README.md").decode())
        for t in texts:
            assert SECRET not in t and SECRET[:-1] not in t
        for f in [*tmp_path.joinpath("lib").rglob("*"), *tmp_path.joinpath("other").rglob("*")]:
            if f.is_file():
                assert SECRET.encode() not in f.read_bytes(), f


@SQLITE_ONLY
def test_sha256_of_pulled_files_matches_the_original(
    library: Library, other: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    src = make_adapter(base_dir, tmp_path / "x", seed=7)
    library.add(src, name="x")
    library.add_remote("origin", REPO)
    library.push()
    other.add_remote("origin", REPO)
    other.pull()
    out = other.export("x", tmp_path / "out")
    assert sha256_file(out / "adapter_model.safetensors") == sha256_file(src / "adapter_model.safetensors")
    assert (out / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()


# --- typed results and errors ----------------------------------------------------------------------


@SQLITE_ONLY
def test_reports_are_typed_and_errors_carry_fields(library: Library, hub: HubServer) -> None:
    with pytest.raises(NotFoundError) as none:
        library.push()
    assert none.value.what == "remote" and none.value.name is None
    added = library.add_remote("origin", REPO)
    assert isinstance(added, Remote) and added == library.remotes()[0]
    with pytest.raises(AlreadyExistsError) as taken:
        library.add_remote("origin", REPO)
    assert (taken.value.what, taken.value.name) == ("remote", "origin")
    with pytest.raises(NotFoundError) as missing:
        library.pull("upstream")
    assert (missing.value.what, missing.value.name) == ("remote", "upstream")
    with pytest.raises(HubError) as no_repo:
        library.pull()  # the repo does not exist yet
    assert no_repo.value.repo_id == REPO and no_repo.value.status == 404
    st = library.status()
    assert isinstance(st, StatusReport) and st.remote == added and st.head is None


def test_sync_records_keep_their_digests_through_the_rename_to_synced_digest(tmp_path: Path) -> None:
    """Migration 0005: remote_experts.synced_sha256 (which always held record digests) becomes
    synced_digest with its values; base models registered before it count as the user's own."""
    from sqlalchemy import text

    from libstore.catalog import migrate
    from libstore.catalog.engine import make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    migrate.upgrade(engine, "0003")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO remotes (id, name, repo_id, repo_type, revision, private, created_at) "
                "VALUES (1, 'origin', 'a/b', 'model', 'main', 0, '2026-01-01 00:00:00')"
            )
        )
        conn.execute(
            text(
                "INSERT INTO remote_experts (remote_id, expert_name, synced_sha256, synced_at) "
                "VALUES (1, 'arc', :d, '2026-01-01 00:00:00')"
            ),
            {"d": "d" * 64},
        )
        conn.execute(
            text(
                "INSERT INTO base_models (name, source, architecture, model_type, fingerprint, "
                "linear_shapes, created_at) VALUES ('tiny', '/m', 'X', 'llama', :f, '{}', "
                "'2026-01-01 00:00:00')"
            ),
            {"f": "f" * 64},
        )
    migrate.upgrade(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT expert_name, synced_digest FROM remote_experts")).all() == [
            ("arc", "d" * 64)
        ]
        assert conn.execute(text("SELECT origin FROM base_models")).all() == [(None,)]
    engine.dispose()
