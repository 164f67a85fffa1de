"""Team libraries: one PostgreSQL catalog + one S3-compatible object store (SeaweedFS), any machine
uses any expert through its own bounded cache; verify and gc act on the shared store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from libstore import Library
from libstore.errors import BlobsRemovedError, IntegrityError, NotFoundError, StorageError, ValidationError
from libstore.ops import gc as gc_mod
from libstore.ops import team as team_ops
from libstore.store import blob_cache, object_store
from libstore.store.object_store import ObjectBlobStore
from tests.factories import load_base, make_adapter
from tests.s3_support import SECRET_KEY

pytestmark = pytest.mark.postgres


def _keys(s3_server: Any, url: str) -> set[str]:
    bucket, _, prefix = url[len("s3://") :].partition("/")
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"].rsplit("/", 1)[-1] for p in pages for o in p.get("Contents", [])}


@pytest.fixture
def team(tmp_path: Path, pg_url: str, s3_url: str, base_dir: Path) -> tuple[Library, Library]:
    """Alice (made the team library, imported 3 experts) and Bob (a second folder on the catalog)."""
    alice = Library.init(tmp_path / "alice", db_url=pg_url, blob_store=s3_url)
    alice.add_base("tiny", str(base_dir))
    for i in range(3):
        alice.add(make_adapter(base_dir, tmp_path / "src" / f"t{i}", seed=i), name=f"t{i}", kind="task")
    bob = Library.init(tmp_path / "bob", db_url=pg_url)
    yield alice, bob
    alice.close()
    bob.close()


def test_second_machine_uses_every_expert(
    team: tuple[Library, Library], tmp_path: Path, base_dir: Path, s3_server: Any, s3_url: str
) -> None:
    alice, bob = team
    assert isinstance(bob.context.blobs, ObjectBlobStore) and bob.context.blobs.url == s3_url
    assert not (tmp_path / "alice" / "blobs" / "sha256").exists()  # nothing kept outside the store
    experts = {e.name: e for e in bob.experts()}
    assert sorted(experts) == ["t0", "t1", "t2"]
    stored = {f.sha256 for e in experts.values() for f in e.files}
    assert stored <= _keys(s3_server, s3_url)

    out = bob.export("t1", tmp_path / "out")
    src = tmp_path / "src" / "t1"
    assert (out / "adapter_model.safetensors").read_bytes() == (
        src / "adapter_model.safetensors"
    ).read_bytes()
    cached = {b.sha256 for b in bob.context.blobs.cache.stats().entries}  # type: ignore[attr-defined]
    assert cached == {f.sha256 for f in experts["t1"].files}  # only what export needed

    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    local = Library.init(tmp_path / "local")
    local.add_base("tiny", str(base_dir))
    for i in range(3):
        local.add(tmp_path / "src" / f"t{i}", name=f"t{i}", kind="task")
    with torch.no_grad():
        ours = bob.routed_model(load_base(base_dir), experts="kind=task", top_k=2)(ids).logits
        ref = local.routed_model(load_base(base_dir), experts="kind=task", top_k=2)(ids).logits
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    local.close()

    assert bob.verify().ok and alice.verify().ok
    report = bob.verify(repair=True)
    assert report.ok and report.repairs == ()


def test_verify_repair_ignores_what_one_cache_lacks(team: tuple[Library, Library]) -> None:
    alice, bob = team
    alice.compute_prototypes("kind=task")
    before = len(bob.compute_prototypes("kind=task").cached)
    assert before == 3
    bob.context.blobs.cache.clear()  # type: ignore[attr-defined]
    report = bob.verify(repair=True)
    assert report.ok and report.repairs == ()
    assert len(alice.compute_prototypes("kind=task").cached) == 3  # nothing shared was dropped


def test_gc_removes_unreferenced_objects_and_honours_claims(
    team: tuple[Library, Library], s3_server: Any, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = team
    w0, w1 = alice.get("t0").sha256, alice.get("t1").sha256
    alice.remove("t0")
    alice.remove("t1")
    assert bob.gc(grace_s=3600).blobs == ()  # just written: within the grace period
    later = time.time() + 7200  # two hours on, a writer on Alice's machine re-uses w1
    for module in (gc_mod, object_store):
        monkeypatch.setattr(module.time, "time", lambda: later)
    assert alice.context.blobs.claim(w1)
    report = bob.gc(grace_s=3600)
    assert report.blobs == (w0,) and w1 in report.kept
    keys = _keys(s3_server, s3_url)
    assert w0 not in keys and w1 in keys
    assert alice.verify().ok and bob.verify().ok


def test_wrong_bytes_from_the_server_are_refused(team: tuple[Library, Library], s3_server: Any) -> None:
    _, bob = team
    e = bob.get("t2")
    store = bob.context.blobs
    assert isinstance(store, ObjectBlobStore)
    w = e.sha256
    s3_server.client().put_object(Bucket=store.bucket, Key=store.key(w), Body=b"not the weights")
    with pytest.raises(IntegrityError) as err:
        bob.export("t2", bob.path / "out")
    assert err.value.exit_code == 7 and "wrong bytes" in str(err.value)
    assert w not in {b.sha256 for b in store.cache.stats().entries}
    assert not store.cache.store.temp_files()
    assert not bob.verify().ok


def test_object_store_failures_are_clear_and_change_nothing(
    team: tuple[Library, Library], tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, s3_url: str
) -> None:
    alice, _ = team
    names = sorted(e.name for e in alice.experts())
    cases = {
        "refused the credentials": {"AWS_SECRET_ACCESS_KEY": "wrong-" + SECRET_KEY},
        "unreachable": {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
    }
    for i, (words, env) in enumerate(cases.items()):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            lib = Library.init(tmp_path / f"m{i}", db_url=pg_url)
            with pytest.raises(StorageError) as err:
                lib.export("t0", tmp_path / f"out{i}")
            assert err.value.exit_code == 13 and words in str(err.value), err.value
            assert SECRET_KEY not in str(err.value) and s3_url in str(err.value)
            lib.close()
    missing = Library.init(tmp_path / "nb", blob_store="s3://no-such-bucket-libstore/x")
    with pytest.raises(StorageError, match="does not exist"):
        missing.context.blobs.put_bytes(b"some bytes")
    missing.close()
    assert sorted(e.name for e in alice.experts()) == names


def test_one_catalog_has_one_blob_store(team: tuple[Library, Library], tmp_path: Path, pg_url: str) -> None:
    with pytest.raises(ValidationError, match="one blob store"):
        Library.init(tmp_path / "other", db_url=pg_url, blob_store="s3://another-bucket/x")
    assert not (tmp_path / "other").exists()
    with pytest.raises(ValidationError, match="not an object store URL"):
        Library.init(tmp_path / "bad", blob_store="http://x")


def test_blob_store_not_set_over_folder_blobs(
    tmp_path: Path, pg_url: str, s3_url: str, base_dir: Path
) -> None:
    solo = Library.init(tmp_path / "solo", db_url=pg_url)
    solo.add_base("tiny", str(base_dir))
    solo.add(make_adapter(base_dir, tmp_path / "src", seed=1), name="a", kind="task")
    with pytest.raises(ValidationError, match="blobs migrate"):
        Library.init(tmp_path / "second", db_url=pg_url, blob_store=s3_url)
    assert not (tmp_path / "second").exists() and not solo.context.blobs.shared
    solo.close()


def test_cache_is_bounded_lru_and_cli_lists_sizes_clears(
    team: tuple[Library, Library], tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import cli_invoker

    alice, _ = team
    weights = {e.name: next(f for f in e.files if f.path.endswith(".safetensors")) for e in alice.experts()}
    one = max(f.size for f in weights.values())
    monkeypatch.setenv("LIBSTORE_CACHE_MAX_BYTES", str(int(one * 1.5)))
    monkeypatch.setattr(blob_cache, "PINNED_S", 0.0)
    carol = Library.init(tmp_path / "carol", db_url=pg_url)
    store = carol.context.blobs
    assert isinstance(store, ObjectBlobStore)
    for name in ("t0", "t1", "t0", "t2"):  # t0 used again after t1: t1 is the least recently used
        store.path(weights[name].sha256)
    cached = {b.sha256 for b in store.cache.stats().entries}
    assert weights["t2"].sha256 in cached and weights["t1"].sha256 not in cached
    assert store.cache.stats().bytes <= int(one * 1.5)

    run = cli_invoker("-L", str(tmp_path / "carol"), "--db", pg_url)
    assert "blobs," in run("cache", "size").output
    assert weights["t2"].sha256[:16] in run("cache", "ls").output
    assert "Removed" in run("cache", "clear").output
    assert carol.cache_stats().entries == ()
    assert carol.verify().ok  # the cache is not the store
    carol.close()
    lone = Library.init(tmp_path / "lone")
    with pytest.raises(ValidationError, match="only a team library"):
        lone.cache_stats()
    lone.close()


def test_blobs_migrate_is_resumable_and_verified(
    tmp_path: Path, s3_url: str, base_dir: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    solo = Library.init(tmp_path / "solo", db_url=pg_url)
    solo.add_base("tiny", str(base_dir))
    for i in range(3):
        solo.add(make_adapter(base_dir, tmp_path / "src" / f"t{i}", seed=i), name=f"t{i}", kind="task")
    solo.compute_prototypes("kind=task")
    local = set(solo.context.blobs)
    real_put = ObjectBlobStore.put_file
    calls = {"n": 0}

    def crashing_put(self, path, *, expected_sha256=None):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 2:
            raise StorageError("connection dropped", location=s3_url)
        return real_put(self, path, expected_sha256=expected_sha256)

    with monkeypatch.context() as m:
        m.setattr(ObjectBlobStore, "put_file", crashing_put)
        m.setattr(team_ops, "WORKERS", 1)
        with pytest.raises(StorageError):
            solo.migrate_blobs(s3_url)
    assert not solo.context.blobs.shared and set(solo.context.blobs) == local  # still a local library
    report = solo.migrate_blobs(s3_url)
    assert len(report.present) == 2 and set(report.uploaded) | set(report.present) == local
    assert solo.context.blobs.shared and solo.verify().ok
    solo.close()
    reopened = Library.open(tmp_path / "solo", db_url=pg_url)
    assert isinstance(reopened.context.blobs, ObjectBlobStore)
    assert set(reopened.context.blobs) == local and reopened.verify().ok
    assert not list((tmp_path / "solo" / "blobs").rglob("*/*/*"))  # the local files moved to the cache
    bob = Library.init(tmp_path / "bob", db_url=pg_url)
    assert bob.export("t1", tmp_path / "out").is_dir()
    reopened.close()
    bob.close()


def test_gc_grace_0_taking_a_staged_copy_is_reported(team: tuple[Library, Library], tmp_path: Path) -> None:
    _, bob = team
    (tmp_path / "f.bin").write_bytes(b"staged bytes " * 100)
    staged = bob.context.blobs.stage_file(tmp_path / "f.bin")
    bob.gc(grace_s=0)  # collects this folder's staging temp files
    with pytest.raises(BlobsRemovedError):
        bob.context.blobs.commit_staged(staged)
    assert not bob.context.blobs.exists(staged.sha256)


def test_folder_libraries_on_one_catalog_say_what_is_missing(
    tmp_path: Path, pg_url: str, base_dir: Path
) -> None:
    """Without an object store, a blob another folder holds is a NotFoundError (exit 4), not a
    FileNotFoundError traceback (the issue's first symptom)."""
    alice = Library.init(tmp_path / "alice", db_url=pg_url)
    alice.add_base("tiny", str(base_dir))
    alice.add(make_adapter(base_dir, tmp_path / "src", seed=1), name="a", kind="task")
    bob = Library.init(tmp_path / "bob", db_url=pg_url)
    with pytest.raises(NotFoundError) as err:
        bob.export("a", tmp_path / "out")
    assert err.value.exit_code == 4 and "is not in the store" in str(err.value)
    alice.close()
    bob.close()
