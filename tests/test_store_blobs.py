"""The content-addressed blob store: layout, atomic writes, dedup, integrity, gc of leftovers."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libstore.errors import IntegrityError, NotFoundError, ValidationError
from libstore.store import blobs as blobs_mod
from libstore.store.blobs import BlobRef, BlobStore, sha256_file


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_put_bytes_layout_and_read(store: BlobStore) -> None:
    ref = store.put_bytes(b"hello")
    d = _digest(b"hello")
    assert ref == BlobRef(d, 5)
    assert store.path(d) == store.root / "sha256" / d[:2] / d
    assert store.path(d).read_bytes() == b"hello"
    assert store.exists(d) and d in store
    assert store.read_bytes(d) == b"hello"
    with store.open(d) as f:
        assert f.read() == b"hello"
    assert store.size(d) == 5
    assert list(store) == [d]


def test_put_file_streams_and_is_read_only(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "w.bin"
    data = os.urandom(3 * blobs_mod.CHUNK + 17)  # several chunks
    src.write_bytes(data)
    ref = store.put_file(src)
    assert ref == BlobRef(_digest(data), len(data))
    assert sha256_file(src) == ref.sha256
    mode = store.path(ref.sha256).stat().st_mode
    assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert store.verify(ref.sha256)
    assert store.temp_files() == []


def test_put_bytes_many_makes_each_new_blob_durable_before_its_rename(
    store: BlobStore, durability_events: list[tuple[str, str]]
) -> None:
    """The batch keeps put_bytes' durability: each new blob's bytes are fsynced before it is renamed
    into place and its shard folder after; stored bytes and repeats are not written again."""
    events = durability_events
    old = store.put_bytes(b"stored before")
    events.clear()
    datas = [b"stored before", b"a", b"b", b"a", bytearray(b"c")]
    refs = store.put_bytes_many(datas)
    assert refs == [BlobRef(_digest(bytes(d)), len(d)) for d in datas] and refs[0] == old
    renames = [tuple(arg.split(" ")) for kind, arg in events if kind == "replace"]
    assert sorted(Path(dst).name for _, dst in renames) == sorted({_digest(d) for d in (b"a", b"b", b"c")})
    for src, dst in renames:
        at = events.index(("replace", f"{src} {dst}"))
        assert ("fsync", src) in events[:at] and ("fsync", str(Path(dst).parent)) in events[at:]
    assert store.temp_files() == [] and all(
        store.read_bytes(r.sha256) == bytes(d) for r, d in zip(refs, datas, strict=True)
    )


def test_dedup_never_rewrites(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "a"
    src.write_bytes(b"same bytes")
    first = store.put_file(src)
    before = store.path(first.sha256).stat()
    assert store.put_file(src) == first
    assert store.put_bytes(b"same bytes") == first
    assert store.put_bytes(b"same bytes", expected_sha256=first.sha256) == first
    after = store.path(first.sha256).stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(_all_files(store.root)) == 1


def test_corrupt_blob_of_wrong_size_is_replaced_by_good_bytes(store: BlobStore) -> None:
    ref = store.put_bytes(b"payload")
    p = store.path(ref.sha256)
    os.chmod(p, 0o644)
    p.write_bytes(b"pay")  # truncated by some accident
    assert not store.verify(ref.sha256)
    assert store.put_bytes(b"payload") == ref
    assert store.verify(ref.sha256)


def test_verify_detects_same_size_corruption(store: BlobStore) -> None:
    ref = store.put_bytes(b"abcdef")
    p = store.path(ref.sha256)
    os.chmod(p, 0o644)
    p.write_bytes(b"abcdeX")
    assert not store.verify(ref.sha256)
    assert not store.verify(_digest(b"never stored"))


@pytest.mark.parametrize(
    "bad",
    [
        "../../etc/passwd",
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "../" + "a" * 61,
        "",
        "sha256:" + "a" * 64,
        "a" * 63 + "\n",
    ],
)
def test_paths_are_built_from_digests_only(store: BlobStore, bad: str) -> None:
    for call in (
        store.path,
        store.exists,
        store.open,
        store.read_bytes,
        store.verify,
        store.delete,
    ):
        with pytest.raises(ValidationError, match="64 lowercase hex"):
            call(bad)
    with pytest.raises(ValidationError):
        store.put_bytes(b"x", expected_sha256=bad)
    assert bad not in store
    assert not store.root.exists()


def test_path_refuses_non_strings(store: BlobStore) -> None:
    with pytest.raises(ValidationError):
        store.path(123)  # type: ignore[arg-type]


def test_expected_sha256_mismatch_stores_nothing(store: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "download"
    src.write_bytes(b"truncated downlo")
    wanted = _digest(b"truncated download")
    with pytest.raises(IntegrityError, match="Nothing was stored"):
        store.put_file(src, expected_sha256=wanted)
    with pytest.raises(IntegrityError, match=wanted):
        store.put_bytes(b"truncated downlo", expected_sha256=wanted)
    assert list(store) == [] and store.temp_files() == []
    assert _all_files(store.root) == []


def test_expected_sha256_checked_even_when_blob_exists(store: BlobStore, tmp_path: Path) -> None:
    ref = store.put_bytes(b"good")
    src = tmp_path / "bad"
    src.write_bytes(b"evil")
    with pytest.raises(IntegrityError):
        store.put_file(src, expected_sha256=ref.sha256)
    assert store.read_bytes(ref.sha256) == b"good"
    src.write_bytes(b"good")
    assert store.put_file(src, expected_sha256=ref.sha256) == ref


def test_source_changing_during_copy_stores_nothing(
    store: BlobStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "moving"
    src.write_bytes(b"version 2")
    # the first pass saw other bytes: as if the file was rewritten between hashing and copying
    monkeypatch.setattr(blobs_mod, "sha256_file", lambda p: _digest(b"version 1"))
    with pytest.raises(IntegrityError, match="changed while it was being stored"):
        store.put_file(src)
    assert list(store) == [] and store.temp_files() == []


def test_crash_before_rename_leaves_no_blob(store: BlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        store.put_bytes(b"data")
    monkeypatch.undo()
    assert list(store) == [] and store.temp_files() == []
    assert not store.exists(_digest(b"data"))


def test_missing_source_is_a_validation_error(store: BlobStore, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="does not exist"):
        store.put_file(tmp_path / "nope")
    with pytest.raises(ValidationError, match="folder"):
        store.put_file(tmp_path)


def test_open_missing_blob(store: BlobStore) -> None:
    d = _digest(b"absent")
    with pytest.raises(NotFoundError, match="libstore verify"):
        store.open(d)
    with pytest.raises(NotFoundError):
        store.size(d)


def test_delete(store: BlobStore) -> None:
    ref = store.put_bytes(b"bye")
    assert store.delete(ref.sha256) is True
    assert not store.exists(ref.sha256)
    assert store.delete(ref.sha256) is False
    assert list(store) == []


def test_iter_skips_temp_and_stray_files(store: BlobStore) -> None:
    refs = sorted(store.put_bytes(bytes([i])).sha256 for i in range(20))
    shard = store.path(refs[0]).parent
    (shard / ".tmp-1-abc").write_bytes(b"partial")
    (shard / "README").write_text("stray")
    (store.root / "sha256" / "zz").mkdir()
    wrong_shard = store.root / "sha256" / "00"
    wrong_shard.mkdir(exist_ok=True)
    (wrong_shard / ("ff" * 32)).write_bytes(b"misplaced")
    assert list(store) == refs


def test_remove_temp_files_by_age(store: BlobStore) -> None:
    ref = store.put_bytes(b"x")
    shard = store.path(ref.sha256).parent
    old, young = shard / ".tmp-999-old", shard / ".tmp-999-young"
    old.write_bytes(b"crash leftover")
    young.write_bytes(b"in flight")
    os.chmod(old, 0o444)
    t = time.time() - 7200
    os.utime(old, (t, t))
    assert store.temp_files() == sorted([old, young])
    assert store.remove_temp_files(older_than_s=3600) == [old]
    assert store.temp_files() == [young]
    assert store.remove_temp_files(older_than_s=0) == [young]
    assert store.temp_files() == []
    assert list(store) == [ref.sha256]


def test_empty_store(store: BlobStore) -> None:
    assert list(store) == []
    assert store.temp_files() == []
    assert store.remove_temp_files() == []


def test_concurrent_puts_of_the_same_bytes(store: BlobStore) -> None:
    data = os.urandom(1 << 16)
    results: list[BlobRef] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            results.append(store.put_bytes(data))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert {r.sha256 for r in results} == {_digest(data)}
    assert list(store) == [_digest(data)]
    assert store.temp_files() == [] and store.verify(_digest(data))


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=4096))
def test_roundtrip_property(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    store = BlobStore(tmp_path_factory.mktemp("prop"))
    ref = store.put_bytes(data)
    assert ref.sha256 == _digest(data) and ref.size == len(data)
    assert store.read_bytes(ref.sha256) == data
    assert store.verify(ref.sha256)
