"""The Hub stand-in, driven by the real huggingface_hub client: every behaviour libstore's sync relies on."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    constants,
    file_exists,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

from tests.hubserver import DEFAULT_TOKEN, HubServer, patch_hf_client, skip_client_backoff

REPO = "tester/lib"
WEIGHTS = os.urandom(50_000)
CONFIG = b'{"r": 4}\n'


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    with HubServer() as server:
        patch_hf_client(monkeypatch, server.url, tmp_path / "hf_home")
        yield server


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)


def _push(api: HfApi, prefix: str = "", weights: bytes = WEIGHTS, **kwargs: object) -> str:
    operations = [
        CommitOperationAdd(f"{prefix}adapter_config.json", CONFIG),
        CommitOperationAdd(f"{prefix}adapter_model.safetensors", weights),
    ]
    return api.create_commit(REPO, operations, commit_message=f"add {prefix or 'root'}", **kwargs).oid


@pytest.fixture
def pushed(api: HfApi, hub: HubServer) -> str:
    api.create_repo(REPO)
    return _push(api, "experts/a/")


def _download(hub: HubServer, filename: str, **kwargs: object) -> bytes:
    return Path(hf_hub_download(REPO, filename, endpoint=hub.url, **kwargs)).read_bytes()


def test_whoami_create_and_delete_repo(api: HfApi, hub: HubServer) -> None:
    me = api.whoami()
    assert me["name"] == "tester" and [o["name"] for o in me["orgs"]] == ["libstore-org"]
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url.endpoint == hub.url
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    assert api.create_repo("libstore-org/shared", private=True).repo_id == "libstore-org/shared"
    assert api.model_info("libstore-org/shared").private is True
    with pytest.raises(HfHubHTTPError) as forbidden:
        api.create_repo("someone-else/x")
    assert forbidden.value.response.status_code == 403
    # Like the Hub, a new repo has one commit holding .gitattributes.
    assert [s.rfilename for s in api.model_info(REPO).siblings] == [".gitattributes"]
    api.delete_repo(REPO)
    assert not api.repo_exists(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(REPO)
    api.delete_repo(REPO, missing_ok=True)


def test_commit_regular_and_lfs_files_then_read_them_back(api: HfApi, hub: HubServer, pushed: str) -> None:
    assert hub.counts["lfs_upload"] == 1 and hub.counts["lfs_verify"] == 1
    assert hub.counts["file"] == 1 and hub.counts["lfsFile"] == 1
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    assert hub.lfs_objects(REPO) == {sha}

    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == pushed == hub.head(REPO)
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {
        ".gitattributes",
        "experts/a/adapter_config.json",
        "experts/a/adapter_model.safetensors",
    }
    assert siblings["experts/a/adapter_model.safetensors"].lfs.sha256 == sha
    assert siblings["experts/a/adapter_config.json"].lfs is None
    assert siblings["experts/a/adapter_config.json"].size == len(CONFIG)

    tree = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert isinstance(tree["experts"], RepoFolder) and isinstance(tree["experts/a"], RepoFolder)
    assert tree["experts/a/adapter_model.safetensors"].lfs.sha256 == sha
    assert tree["experts/a/adapter_model.safetensors"].size == len(WEIGHTS)
    assert [e.path for e in api.list_repo_tree(REPO)] == [".gitattributes", "experts"]
    assert [e.path for e in api.list_repo_tree(REPO, "experts/a")] == [
        "experts/a/adapter_config.json",
        "experts/a/adapter_model.safetensors",
    ]
    paths = api.get_paths_info(
        REPO, ["experts/a/adapter_model.safetensors", "experts", "missing"], expand=True
    )
    assert [type(p) for p in paths] == [RepoFile, RepoFolder]
    assert paths[0].lfs.sha256 == sha and paths[0].last_commit.oid == pushed

    assert _download(hub, "experts/a/adapter_model.safetensors") == WEIGHTS
    assert _download(hub, "adapter_config.json", subfolder="experts/a") == CONFIG
    assert file_exists(
        REPO, "experts/a/adapter_config.json"
    )  # module-level function: patched default endpoint
    folder = Path(snapshot_download(REPO, endpoint=hub.url, allow_patterns=["experts/*"]))
    assert (folder / "experts/a/adapter_model.safetensors").read_bytes() == WEIGHTS
    assert folder.name == pushed


def test_uploading_a_known_lfs_object_is_skipped(api: HfApi, hub: HubServer, pushed: str) -> None:
    _push(api, "experts/b/")  # same weights under another path
    assert hub.counts["lfs_upload"] == 1
    assert _download(hub, "experts/b/adapter_model.safetensors") == WEIGHTS
    # Unchanged files are dropped by the client after preupload reported their remote oid: no new commit.
    before = hub.head(REPO)
    assert _push(api, "experts/b/") == before and hub.counts["commit"] == 2


def test_stale_parent_commit_is_refused_with_412(api: HfApi, hub: HubServer, pushed: str) -> None:
    _push(api, "experts/b/", parent_commit=pushed)
    with pytest.raises(HfHubHTTPError) as stale:
        _push(api, "experts/c/", parent_commit=pushed)
    assert stale.value.response.status_code == 412
    assert not api.file_exists(REPO, "experts/c/adapter_config.json")


def test_branches_tags_history_and_deletes(api: HfApi, hub: HubServer, pushed: str) -> None:
    api.create_tag(REPO, tag="v1", tag_message="first")
    api.create_branch(REPO, branch="dev")
    dev = _push(api, "experts/d/", revision="dev")
    second = api.delete_folder("experts/a", REPO, commit_message="drop a").oid
    api.delete_file(".gitattributes", REPO)
    assert api.list_repo_files(REPO) == []
    assert api.list_repo_files(REPO, revision="v1") == api.list_repo_files(REPO, revision=pushed[:7])
    assert len(api.list_repo_files(REPO, revision="dev")) == 5

    assert _download(hub, "experts/a/adapter_config.json", revision="v1") == CONFIG
    assert _download(hub, "experts/a/adapter_model.safetensors", revision=pushed) == WEIGHTS
    assert _download(hub, "experts/d/adapter_config.json", revision="dev") == CONFIG
    assert api.model_info(REPO, revision="v1").sha == pushed

    refs = api.list_repo_refs(REPO)
    assert {b.name: b.target_commit for b in refs.branches} == {"dev": dev, "main": hub.head(REPO)}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", pushed)]
    history = api.list_repo_commits(REPO)
    assert [c.title for c in history] == [
        "Delete .gitattributes with huggingface_hub",
        "drop a",
        "add experts/a/",
        "initial commit",
    ]
    assert history[1].commit_id == second and history[1].authors == ["tester"]
    assert [c.commit_id for c in api.list_repo_commits(REPO, revision="dev")][:2] == [dev, pushed]

    with pytest.raises(HfHubHTTPError) as exists:
        api.create_tag(REPO, tag="v1")
    assert exists.value.response.status_code == 409
    api.create_tag(REPO, tag="v1", exist_ok=True)
    api.delete_tag(REPO, tag="v1")
    api.delete_branch(REPO, branch="dev")
    assert api.list_repo_refs(REPO).tags == []
    with pytest.raises(RevisionNotFoundError):
        api.delete_branch(REPO, branch="dev")
    with pytest.raises(EntryNotFoundError):
        api.delete_file("nope.txt", REPO)


def test_client_raises_its_specific_errors(api: HfApi, hub: HubServer, pushed: str) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("tester/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("tester/missing", "x.json", endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, "experts/a/adapter_config.json", revision="nope")
    with pytest.raises(EntryNotFoundError):
        _download(hub, "experts/a/missing.json")
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(REPO, "no/such/folder"))
    with pytest.raises(RevisionNotFoundError):
        _push(api, "x/", revision="no-branch")
    assert not api.file_exists(REPO, "missing.json")
    assert not api.revision_exists(REPO, "nope")


def test_private_repos_and_required_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with HubServer(token="secret") as server:
        patch_hf_client(monkeypatch, server.url, tmp_path, token="secret")
        api = HfApi(endpoint=server.url, token="secret")
        api.create_repo(REPO, private=True)
        assert api.model_info(REPO).private is True
        with pytest.raises(HfHubHTTPError) as denied:
            HfApi(endpoint=server.url, token="wrong").model_info(REPO)
        assert denied.value.response.status_code == 401
        with pytest.raises(HfHubHTTPError, match="Invalid user token"):
            HfApi(endpoint=server.url, token="wrong").whoami()
    with HubServer() as server:
        patch_hf_client(monkeypatch, server.url, tmp_path)
        HfApi(endpoint=server.url, token=DEFAULT_TOKEN).create_repo(REPO, private=True)
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=server.url, token=False).model_info(REPO)
        with pytest.raises(HfHubHTTPError) as anonymous:
            HfApi(endpoint=server.url, token=False).create_repo("tester/other")
        assert anonymous.value.response.status_code == 401


def test_range_requests(hub: HubServer, pushed: str) -> None:
    url = f"{hub.url}/{REPO}/resolve/main/experts/a/adapter_model.safetensors"
    response = httpx2.get(url, headers={"Range": "bytes=10-19"})
    assert response.status_code == 206 and response.content == WEIGHTS[10:20]
    assert response.headers["Content-Range"] == f"bytes 10-19/{len(WEIGHTS)}"
    assert response.headers["X-Linked-Etag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert response.headers["X-Repo-Commit"] == pushed
    assert httpx2.get(url, headers={"Range": "bytes=-5"}).content == WEIGHTS[-5:]
    assert httpx2.get(url, headers={"Range": "bytes=49990-"}).content == WEIGHTS[49990:]
    assert httpx2.get(url, headers={"Range": f"bytes={len(WEIGHTS)}-"}).status_code == 416


def test_pagination_is_followed_by_the_client(api: HfApi, hub: HubServer, pushed: str) -> None:
    hub.page_size = 1
    assert len(list(api.list_repo_tree(REPO, recursive=True))) == 5
    assert len(api.list_repo_commits(REPO)) == 2
    assert [r.kind for r in hub.log if "cursor=" in r.query] == ["tree"] * 4 + ["commits"]


def test_lfs_batch_download_action(hub: HubServer, pushed: str) -> None:
    oid = hashlib.sha256(WEIGHTS).hexdigest()
    batch = httpx2.post(
        f"{hub.url}/{REPO}.git/info/lfs/objects/batch",
        json={
            "operation": "download",
            "objects": [{"oid": oid, "size": len(WEIGHTS)}, {"oid": "0" * 64, "size": 1}],
        },
        headers={"Authorization": f"Bearer {DEFAULT_TOKEN}"},
    ).json()
    found, missing = batch["objects"]
    assert httpx2.get(found["actions"]["download"]["href"]).content == WEIGHTS
    assert missing["error"]["code"] == 404
    assert httpx2.get(found["actions"]["download"]["href"].split("?")[0]).status_code == 403


def test_fault_failed_lfs_upload_fails_the_commit_and_nothing_lands(api: HfApi, hub: HubServer) -> None:
    api.create_repo(REPO)
    initial = hub.head(REPO)
    hub.faults.fail_next("lfs_upload", status=507)
    with pytest.raises(RuntimeError, match="Error while uploading") as failed:
        _push(api)
    assert isinstance(failed.value.__cause__, HfHubHTTPError)
    assert hub.head(REPO) == initial and hub.counts["commit"] == 0
    _push(api)
    assert hub.counts["lfs_upload"] == 2


@pytest.mark.parametrize("kind", ["preupload", "lfs_batch", "commit"])
def test_fault_fail_next_surfaces_as_http_error(api: HfApi, hub: HubServer, kind: str) -> None:
    api.create_repo(REPO)
    hub.faults.fail_next(kind, status=507, message="disk full")
    with pytest.raises(HfHubHTTPError, match="disk full") as failed:
        _push(api)
    assert failed.value.response.status_code == 507
    _push(api)


def test_fault_transient_5xx_is_retried_by_the_client(
    api: HfApi, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    skip_client_backoff(monkeypatch)
    api.create_repo(REPO)
    hub.faults.fail_next("lfs_upload", status=503, count=2)
    _push(api)
    assert hub.counts["lfs_upload"] == 3


def test_fault_commit_applied_but_answer_lost(api: HfApi, hub: HubServer, pushed: str) -> None:
    hub.faults.commit_succeeds_but_times_out()
    with pytest.raises(httpx2.RemoteProtocolError):
        _push(api, "experts/b/", parent_commit=pushed)
    assert hub.head(REPO) != pushed  # it landed: a blind retry against the old head is refused
    with pytest.raises(HfHubHTTPError) as stale:
        _push(api, "experts/b/", weights=WEIGHTS[::-1], parent_commit=pushed)
    assert stale.value.response.status_code == 412
    assert api.file_exists(REPO, "experts/b/adapter_model.safetensors")


def test_fault_wrong_bytes_are_served_with_the_right_headers(api: HfApi, hub: HubServer, pushed: str) -> None:
    hub.faults.wrong_bytes("*.safetensors")
    path = "experts/a/adapter_model.safetensors"
    data = _download(hub, path)
    (info,) = api.get_paths_info(REPO, [path])
    assert len(data) == len(WEIGHTS) and hashlib.sha256(data).hexdigest() != info.lfs.sha256
    assert hub.read_file(REPO, path) == WEIGHTS
    assert _download(hub, "experts/a/adapter_config.json") == CONFIG
    hub.faults.clear()
    assert _download(hub, path, force_download=True) == WEIGHTS


def test_fault_cut_download_is_resumed_or_fails(
    hub: HubServer, pushed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    skip_client_backoff(monkeypatch)
    # The client only keeps whole chunks (10 MiB by default) of a broken download, then resumes with a Range.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 1000)
    path = "experts/a/adapter_model.safetensors"
    hub.faults.cut_download(path, after_bytes=1000)
    assert _download(hub, path) == WEIGHTS
    ranges = [r.headers.get("Range") for r in hub.log if r.kind == "download"]
    assert ranges == [None, "bytes=1000-"]
    hub.faults.cut_download(path, after_bytes=0, count=None)
    with pytest.raises(httpx2.RemoteProtocolError):
        _download(hub, path, force_download=True)


def test_fault_failed_download(hub: HubServer, pushed: str) -> None:
    hub.faults.fail_next("download", status=507)
    with pytest.raises(HfHubHTTPError) as failed:
        _download(hub, "experts/a/adapter_config.json")
    assert failed.value.response.status_code == 507
    hub.faults.drop_next("head")
    with pytest.raises(httpx2.RemoteProtocolError):
        _download(hub, "experts/a/adapter_config.json", revision=pushed)
    with pytest.raises(ValueError, match="unknown request kind"):
        hub.faults.fail_next("uploads")


def test_stopped_server_is_unreachable_even_over_pooled_connections(api: HfApi, hub: HubServer) -> None:
    api.whoami()  # leaves a keep-alive connection in the client's pool
    hub.stop()
    with pytest.raises(httpx2.TransportError):
        api.whoami()


def test_peft_loads_an_adapter_from_a_subfolder(api: HfApi, hub: HubServer, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "adapter")
    expected = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    api.create_repo(REPO)
    api.upload_folder(repo_id=REPO, folder_path=tmp_path / "adapter", path_in_repo="experts/x")
    assert hub.counts["lfs_upload"] == 1

    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(LlamaForCausalLM(config), REPO, subfolder="experts/x")
    downloaded = {r.path.rsplit("/", 1)[-1] for r in hub.log if r.kind == "download"}
    assert downloaded == {"adapter_config.json", "adapter_model.safetensors"}
    state = loaded.state_dict()
    assert expected and all(torch.equal(state[k], v) for k, v in expected.items())
