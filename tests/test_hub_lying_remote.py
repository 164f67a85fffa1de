"""A remote that lies (issue 12, items 5, 6, 7, 10): nothing a remote says is trusted to run, to poison
the caches, to fill the disk or to hang a pull. Real client, the Hub stand-in with fault injection."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.torch import load_file, save_file

from libstore import Library
from libstore.catalog.models import ExpertRow
from libstore.errors import HubError, IntegrityError, RouterError, ValidationError
from libstore.hub.manifest import MANIFEST_FILE, ManifestError
from libstore.store.safetensors_io import read_header
from tests import hub_support as support
from tests.factories import make_adapter
from tests.hub_support import REPO, add_experts, snapshot
from tests.hubserver import DEFAULT_TOKEN, HubServer

hub, other = support.hub, support.other  # fixtures

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.parametrize("db_url", [None], ids=["sqlite"]),
]
WEIGHTS = "adapter_model.safetensors"


def _commit(hub: HubServer, files: dict[str, bytes]) -> None:
    ops = [CommitOperationAdd(p, b) for p, b in files.items()]
    HfApi(endpoint=hub.url, token=DEFAULT_TOKEN).create_commit(REPO, ops, commit_message="tamper")


def _pushed(
    library: Library, hub: HubServer, base_dir: Path, tmp_path: Path, names: list[str]
) -> dict[str, Any]:
    """Push experts ``names`` from ``library``; returns the remote's manifest."""
    add_experts(library, base_dir, tmp_path, names)
    library.add_remote("origin", REPO)
    library.push()
    return json.loads(hub.read_file(REPO, MANIFEST_FILE))


# --- 5. the remote does not pick the base model's weights ------------------------------------------


class _Boom:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.marker, "w"))


def test_pulled_base_model_is_not_loaded_from_the_source_the_remote_names(
    library: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    manifest = _pushed(library, hub, base_dir, tmp_path, ["a", "b"])
    # the remote names a model whose weights are a pickle that runs code when unpickled
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil-base"
    evil.mkdir()
    shutil.copy(base_dir / "config.json", evil / "config.json")
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Boom(marker)}))
    manifest["base_models"]["tiny"]["source"] = str(evil)
    _commit(hub, {MANIFEST_FILE: json.dumps(manifest).encode()})

    fresh = Library.init(tmp_path / "fresh")  # no base registered: the pull registers it
    fresh.add_remote("origin", REPO)
    pulled = fresh.pull()
    assert sorted(pulled.added) == ["a", "b"]
    base = fresh.base("tiny")
    assert base.source == str(evil) and base.origin == f"hf://{REPO}@{pulled.commit}"
    assert library.base("tiny").origin is None  # registered by the user: trusted
    with pytest.raises(RouterError) as refused:
        fresh.routed_model(experts="kind=task")
    assert "--base" in str(refused.value)
    # named by the user, a pickle is still never loaded: safetensors only
    with pytest.raises(RouterError) as no_safetensors:
        fresh.routed_model(str(evil), experts="kind=task")
    assert "safetensors" in str(no_safetensors.value)
    assert not marker.exists()
    model = fresh.routed_model(str(base_dir), experts="kind=task", top_k=1)
    assert sorted(model.experts) == ["a", "b"]
    fresh.close()


# --- 6. pulled prototypes are the prototypes of the pulled weights --------------------------------


def _prototype_entry(manifest: dict[str, Any], expert: str) -> dict[str, Any]:
    return next(p for p in manifest["prototypes"] if p["expert"] == expert)


def _retamper_prototypes(
    hub: HubServer, manifest: dict[str, Any], entry: dict[str, Any], data: bytes
) -> None:
    entry.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    _commit(hub, {MANIFEST_FILE: json.dumps(manifest).encode(), entry["path"]: data})


def _rewrite(path: Path, out: Path, edit: Any) -> bytes:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, out, metadata=read_header(path).metadata)
    return out.read_bytes()


def test_poisoned_prototypes_are_refused(
    library: Library, other: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    add_experts(library, base_dir, tmp_path, ["a", "b"])
    library.compute_prototypes("kind=task")
    library.add_remote("origin", REPO)
    library.push()
    manifest = json.loads(hub.read_file(REPO, MANIFEST_FILE))
    entry = _prototype_entry(manifest, "a")
    blob = library.context.blobs.path(entry["sha256"])

    def poison(t: dict[str, torch.Tensor]) -> None:  # right header, right shapes, other vectors
        for k in t:
            if k.startswith("vectors::"):
                v = torch.randn(t[k].shape, generator=torch.Generator().manual_seed(0))
                t[k] = v / v.norm(dim=-1, keepdim=True)

    _retamper_prototypes(hub, manifest, entry, _rewrite(blob, tmp_path / "poison.safetensors", poison))
    other.add_remote("origin", REPO)
    before = snapshot(other)
    with pytest.raises(IntegrityError) as refused:
        other.pull()
    assert refused.value.path == entry["path"]
    assert snapshot(other) == before and other.prototype_cache() == []

    # the right prototypes (the library's own file) are taken, and the router uses them
    _retamper_prototypes(hub, manifest, entry, blob.read_bytes())
    assert other.pull().prototypes == 2
    assert {p.blob_sha256 for p in other.prototype_cache()} == {
        p.blob_sha256 for p in library.prototype_cache()
    }


def test_prototypes_of_repeated_singular_values_may_be_any_basis_of_the_subspace(
    library: Library, other: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    """Where σ₁ = σ₂ every orthonormal basis of the top subspace is right: a remote that computed
    another one (other hardware) is not refused."""
    folder = make_adapter(base_dir, tmp_path / "deg", seed=3, singular_values=[2.0, 2.0, 1.0, 0.5])
    library.add(folder, name="deg")
    library.compute_prototypes("deg", top_n=2)
    library.add_remote("origin", REPO)
    library.push()
    manifest = json.loads(hub.read_file(REPO, MANIFEST_FILE))
    entry = _prototype_entry(manifest, "deg")

    def rotate(t: dict[str, torch.Tensor]) -> None:
        c = 0.5**0.5
        for k in t:
            if k.startswith("vectors::"):
                v1, v2 = t[k][0].clone(), t[k][1].clone()
                t[k][0], t[k][1] = c * (v1 + v2), c * (v1 - v2)

    data = _rewrite(library.context.blobs.path(entry["sha256"]), tmp_path / "rot.safetensors", rotate)
    _retamper_prototypes(hub, manifest, entry, data)
    other.add_remote("origin", REPO)
    assert other.pull().prototypes == 1


def test_prototypes_this_libstore_cannot_check_are_not_taken(
    library: Library, other: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    add_experts(library, base_dir, tmp_path, ["a"])
    library.compute_prototypes("a")
    library.add_remote("origin", REPO)
    library.push()
    manifest = json.loads(hub.read_file(REPO, MANIFEST_FILE))
    entry = manifest["prototypes"][0]
    data = hub.read_file(REPO, entry["path"])
    version = entry["method_version"]
    entry["method_version"] = version + 90  # a newer libstore's method
    entry["path"] = entry["path"].replace(f"-v{version}-", f"-v{version + 90}-")
    _commit(hub, {MANIFEST_FILE: json.dumps(manifest).encode(), entry["path"]: data})
    other.add_remote("origin", REPO)
    r = other.pull()
    assert r.added == ("a",) and r.prototypes == 0 and r.prototypes_skipped == (entry["path"],)
    assert other.prototype_cache() == []


# --- 7. downloads are bounded in size and time -----------------------------------------------------


def _weights_path(name: str) -> str:
    return f"experts/{name}/{WEIGHTS}"


def test_endless_download_is_cut_off_at_the_manifests_size(
    library: Library, other: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    _pushed(library, hub, base_dir, tmp_path, ["a"])
    size = library.get("a").file(WEIGHTS).size
    other.add_remote("origin", REPO)
    before = snapshot(other)
    hub.faults.endless_download(_weights_path("a"))
    with pytest.raises(IntegrityError) as cut:
        other.pull()
    assert cut.value.path == _weights_path("a")
    assert snapshot(other) == before and not list((other.path / ".tmp").glob("*"))
    time.sleep(0.2)  # the server notices the hang-up
    assert 0 < hub.counts["endless_bytes"] < size + (16 << 20)  # stopped reading, did not drain it
    hub.faults.clear()
    assert other.pull().added == ("a",)


def test_endless_download_is_cut_off_for_import_hub_too(
    library: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    _pushed(library, hub, base_dir, tmp_path, ["a"])
    library.remove("a")
    hub.faults.endless_download(_weights_path("a"))
    with pytest.raises(IntegrityError):
        library.import_hub(REPO, subfolder="experts/a")
    assert hub.counts["endless_bytes"] < (16 << 20) and [e.name for e in library.experts()] == []


@pytest.mark.parametrize(
    "chunk, every_s", [(256, 0.5), (64, 5.0)], ids=["trickle-past-the-deadline", "stall"]
)
def test_trickling_or_stalled_download_is_abandoned(
    library: Library,
    other: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunk: int,
    every_s: float,
) -> None:
    _pushed(library, hub, base_dir, tmp_path, ["a"])
    size = library.get("a").file(WEIGHTS).size
    assert size / chunk * every_s > 5  # served whole, this trickle would take longer than 5 s
    monkeypatch.setenv("LIBSTORE_HUB_STALL_TIMEOUT", "1")
    monkeypatch.setenv("LIBSTORE_HUB_MIN_RATE", str(1 << 20))
    other.add_remote("origin", REPO)
    before = snapshot(other)
    hub.faults.trickle_download(_weights_path("a"), chunk=chunk, every_s=every_s)
    t0 = time.monotonic()
    with pytest.raises(HubError) as slow:
        other.pull()
    assert time.monotonic() - t0 < 4
    assert slow.value.repo_id == REPO and "LIBSTORE_HUB_" in str(slow.value)  # says which limit
    assert snapshot(other) == before
    hub.faults.clear()
    assert other.pull().added == ("a",)


def test_download_limits_must_be_positive_numbers(
    library: Library,
    other: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pushed(library, hub, base_dir, tmp_path, ["a"])
    other.add_remote("origin", REPO)
    for bad in ("0", "-1", "nan", "soon"):
        monkeypatch.setenv("LIBSTORE_HUB_STALL_TIMEOUT", bad)
        with pytest.raises(ValidationError) as refused:
            other.pull()
        assert refused.value.field == "LIBSTORE_HUB_STALL_TIMEOUT"


def test_files_over_the_size_limit_are_refused_before_any_download(
    library: Library,
    other: Library,
    hub: HubServer,
    base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _pushed(library, hub, base_dir, tmp_path, ["a"])
    size = library.get("a").file(WEIGHTS).size
    monkeypatch.setenv("LIBSTORE_MAX_FILE_BYTES", str(size - 1))
    other.add_remote("origin", REPO)
    hub.reset_stats()
    with pytest.raises(ValidationError) as big:
        other.pull()
    assert big.value.path == _weights_path("a") and hub.counts["download"] == 1  # the manifest only
    with pytest.raises(ValidationError) as big_import:
        other.import_hub(REPO, subfolder="experts/a", base="tiny")
    assert big_import.value.path == _weights_path("a") and hub.counts["download"] == 1


def test_import_hub_checks_small_files_against_their_git_blob_id(
    library: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    """A regular (non-LFS) file has no sha256 on the Hub; its git blob id is checked instead."""
    _pushed(library, hub, base_dir, tmp_path, ["a"])
    library.remove("a")
    hub.faults.wrong_bytes("experts/a/adapter_config.json")
    with pytest.raises(IntegrityError) as wrong:
        library.import_hub(REPO, subfolder="experts/a")
    assert wrong.value.path == "experts/a/adapter_config.json" and wrong.value.sha256 is None
    hub.faults.clear()
    assert library.import_hub(REPO, subfolder="experts/a").name == "a"


# --- 10. lone surrogates -------------------------------------------------------------------------


def test_pulled_manifest_with_lone_surrogates_is_refused(
    library: Library, other: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    manifest = _pushed(library, hub, base_dir, tmp_path, ["a"])
    manifest["experts"]["a"]["metadata"] = {"note": "\ud800"}
    _commit(hub, {MANIFEST_FILE: json.dumps(manifest).encode()})  # ASCII JSON: "\ud800" escaped
    other.add_remote("origin", REPO)
    before = snapshot(other)
    with pytest.raises(ManifestError, match="surrogate"):
        other.pull()
    assert snapshot(other) == before


def test_push_of_metadata_with_lone_surrogates_fails_cleanly(
    library: Library, hub: HubServer, base_dir: Path, tmp_path: Path
) -> None:
    """A library written before surrogates were refused at the boundary may hold one."""
    _pushed(library, hub, base_dir, tmp_path, ["a"])
    head = hub.head(REPO)
    add_experts(library, base_dir, tmp_path, ["b"], seed0=5)
    with library.context.catalog.write() as s:  # as an older libstore could have stored it
        from sqlalchemy import select

        s.scalar(select(ExpertRow).where(ExpertRow.name == "b")).extra = {"note": "\udcff"}
    with pytest.raises(ValidationError, match="surrogate") as refused:
        library.push()
    assert "['experts']['b']['metadata']" in str(refused.value) and hub.head(REPO) == head
    with pytest.raises(ValidationError) as bad_message:
        library.push(message="fix \udcff")
    assert bad_message.value.field == "message"
