"""The stored weights are exactly the validated bytes (staging), and a blob store that cannot be
written (full disk, read-only file system) gives StorageError, leaves no temp file, changes nothing.

The disk tests mount real tmpfs file systems (root and mount(8) are needed, as on CI); they fail —
never skip — where mounting is impossible.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from libstore import Library
from libstore.cli import cli
from libstore.errors import StorageError, ValidationError
from libstore.ops.experts import store_adapter_files
from libstore.store.adapter import read_adapter
from libstore.store.blobs import BlobStore
from libstore.store.safetensors_io import load_tensors, nonfinite_tensors, read_header, save_tensors
from libstore.types import ADAPTER_WEIGHTS, StagedBlob
from tests.factories import make_adapter


@pytest.fixture
def lib(tmp_path: Path, base_dir: Path) -> Library:
    lib = Library.init(tmp_path / "lib")
    lib.add_base("tiny", str(base_dir))
    return lib


def _nan_copy(good: Path, out: Path) -> Path:
    t = load_tensors(good)
    first = sorted(t)[0]
    t[first] = t[first].clone()
    t[first][0, 0] = float("nan")
    save_tensors(t, out, metadata={"format": "pt"})
    return out


def _store_files(store: BlobStore) -> dict[str, bytes]:
    root = store.root
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- item 9: validated file = stored file -------------------------------------------------------


def test_source_swapped_after_validation_stores_the_validated_bytes(
    lib: Library, base_dir: Path, tmp_path: Path
) -> None:
    folder = make_adapter(base_dir, tmp_path / "a", seed=3)
    w = folder / ADAPTER_WEIGHTS
    good = w.read_bytes()
    nan = _nan_copy(w, tmp_path / "nan.safetensors").read_bytes()
    ctx = lib.context
    adapter = read_adapter(folder, into=ctx.blobs)  # what `add` does: validate ...
    w.write_bytes(nan)  # ... the source changes (or a symlink flips) ...
    files = store_adapter_files(ctx, adapter)  # ... then store
    weights = next(f for f in files if f.path == ADAPTER_WEIGHTS)
    assert weights.sha256 == hashlib.sha256(good).hexdigest() == adapter.weights_sha256
    assert ctx.blobs.read_bytes(weights.sha256) == good
    assert hashlib.sha256(nan).hexdigest() not in ctx.blobs
    assert ctx.blobs.temp_files() == []


@pytest.mark.slow
def test_symlink_flipping_during_add_never_stores_nan(lib: Library, base_dir: Path, tmp_path: Path) -> None:
    """A thread flips the weights symlink between a good and a NaN file while `add` runs."""
    folder = make_adapter(base_dir, tmp_path / "a", seed=4)
    w = folder / ADAPTER_WEIGHTS
    good = w.rename(tmp_path / "good.safetensors")
    nan = _nan_copy(good, tmp_path / "nan.safetensors")
    good_sha = hashlib.sha256(good.read_bytes()).hexdigest()
    w.symlink_to(good)
    stop = threading.Event()

    def flip() -> None:
        tmp = folder / "flip.tmp"
        n = 0
        while not stop.is_set():
            n += 1
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(nan if n % 2 else good)
            tmp.replace(w)  # atomic: the path always names one of the two

    flipper = threading.Thread(target=flip, daemon=True)
    flipper.start()
    added, refused = 0, 0
    try:
        for i in range(60):
            try:
                e = lib.add(folder, name=f"x{i}")
            except ValidationError as err:
                assert "NaN or Inf" in str(err)
                refused += 1
            else:
                assert e.sha256 == good_sha
                added += 1
    finally:
        stop.set()
        flipper.join()
    assert added and refused, (added, refused)  # the flips really happened during both outcomes
    for sha in lib.context.blobs:  # no NaN blob ever entered the store, referenced or not
        path = lib.context.blobs.path(sha)
        with contextlib.suppress(ValidationError):
            assert nonfinite_tensors(path, read_header(path)) == []
    assert lib.context.blobs.temp_files() == []


def test_staged_copy_taken_by_gc_during_validation_is_blobs_removed(
    lib: Library, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ``gc --grace 0`` that takes an import's staged copy while it is being validated makes the
    import fail with ``BlobsRemovedError`` (exit 9: run it again), not a ``ValidationError`` saying
    the library's own temp file does not exist; nothing is recorded."""
    from libstore.errors import BlobsRemovedError
    from libstore.store import adapter as adapter_mod

    real = adapter_mod._describe

    def gc_took_it(
        folder: Path,
        config_path: Path,
        config_bytes: bytes,
        weights_path: Path,
        staged: StagedBlob,
        **kw: bool,
    ) -> object:
        Path(staged.path).unlink()
        return real(folder, config_path, config_bytes, weights_path, staged, **kw)

    monkeypatch.setattr(adapter_mod, "_describe", gc_took_it)
    with pytest.raises(BlobsRemovedError) as err:
        lib.add(make_adapter(base_dir, tmp_path / "a", seed=3), name="a")
    assert err.value.exit_code == 9 and err.value.sha256s
    assert lib.experts() == [] and lib.context.blobs.temp_files() == []


def test_staging_api(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    src = tmp_path / "src"
    src.write_bytes(b"payload")
    staged = store.stage_file(src)
    assert staged.sha256 == hashlib.sha256(b"payload").hexdigest() and staged.size == 7
    assert Path(staged.path).read_bytes() == b"payload" and store.temp_files() == [Path(staged.path)]
    src.write_bytes(b"changed")  # the source no longer matters
    ref = store.commit_staged(staged)
    assert store.read_bytes(ref.sha256) == b"payload" and store.temp_files() == []
    store.discard(staged)  # after a commit: a no-op, the blob stays
    assert store.exists(ref.sha256)
    again = store.stage_file(tmp_path / "src")
    src.write_bytes(b"payload")
    dup = store.stage_file(src)
    assert store.commit_staged(dup) == ref and store.temp_files() == [Path(again.path)]  # dedup drops it
    store.discard(again)
    assert store.temp_files() == [] and list(store) == [ref.sha256]
    store.discard(StagedBlob(str(store.path(ref.sha256)), ref.sha256, ref.size))  # never removes a blob
    assert store.exists(ref.sha256)
    with store.discarding(items := [store.stage_file(src)]):
        assert len(store.temp_files()) == 1
    assert store.temp_files() == [] and items


def test_import_dir_records_only_blobs_whose_bytes_and_names_are_durable(
    lib: Library,
    base_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    durability_events: list[tuple[str, str]],
) -> None:
    """import-dir stages its weights without an fsync each and fsyncs them together once all are
    validated: still every blob's bytes are fsynced before its rename, its shard folder after the
    rename, and all of it before the catalog commits."""
    from libstore.catalog import engine

    for i in range(3):
        make_adapter(base_dir, tmp_path / "in" / f"a{i}", seed=20 + i)
    events = durability_events
    events.clear()
    real_write = engine.Catalog.write

    @contextlib.contextmanager
    def write(self: engine.Catalog) -> Iterator[engine.Transaction]:
        with real_write(self) as tx:
            yield tx
            events.append(("commit", ""))

    monkeypatch.setattr(engine.Catalog, "write", write)
    assert len(lib.import_dir(tmp_path / "in").added) == 3
    blobs = str(lib.context.blobs.root)
    renames = [
        arg.split(" ") for kind, arg in events if kind == "replace" and arg.split(" ")[1].startswith(blobs)
    ]
    assert len(renames) == 4  # three weights files and their one shared config
    commit = events.index(("commit", ""))
    for src, dst in renames:
        at = events.index(("replace", f"{src} {dst}"))
        assert ("fsync", src) in events[:at], f"{dst} renamed before its bytes were fsynced"
        assert ("fsync", str(Path(dst).parent)) in events[at:commit], f"{dst}'s folder not fsynced"


def test_gc_collects_staged_copies_of_a_crash_only_after_the_grace_period(
    lib: Library, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"left behind by a killed import")
    staged = lib.context.blobs.stage_file(src)
    assert lib.gc().temp == ()  # young: may be in use
    assert Path(staged.path).exists()
    report = lib.gc(grace_s=0)
    assert len(report.temp) == 1 and not Path(staged.path).exists()


# --- item 11: a blob store that cannot be written -------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.fail(
            f"this test mounts a tmpfs at {path} to get a real full / read-only disk; it needs root "
            f"and mount(8), as on CI: {r.stderr.strip() or r.returncode}"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _read_only(path: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"could not remount {path} read-only: {r.stderr.strip()}")


def _big_adapter(base_dir: Path, folder: Path) -> Path:
    """An adapter whose weights (~1.1 MiB) cannot fit on a 1 MiB disk."""
    return make_adapter(base_dir, folder, r=1100, seed=5)


def test_full_disk_gives_storage_error_and_changes_nothing(
    lib: Library, base_dir: Path, tmp_path: Path
) -> None:
    small = make_adapter(base_dir, tmp_path / "small", seed=6)
    big = _big_adapter(base_dir, tmp_path / "big")
    with tmpfs(lib.context.blobs.root):
        lib.add(small, name="small")
        before = _store_files(lib.context.blobs), [e.name for e in lib.experts()]
        with pytest.raises(StorageError) as e:
            lib.add(big, name="big")
        assert e.value.exit_code == 13 and e.value.location == str(lib.context.blobs.root)
        assert "disk is full" in str(e.value) and "libstore gc" in str(e.value)
        assert (_store_files(lib.context.blobs), [x.name for x in lib.experts()]) == before
        assert lib.context.blobs.temp_files() == []
        result = CliRunner().invoke(cli, ["-L", str(lib.path), "add", str(big), "--name", "big"])
        assert result.exit_code == 13 and "disk is full" in result.output, result.output
        with pytest.raises(StorageError):  # the plain write path too
            lib.context.blobs.put_bytes(torch.zeros(300_000).numpy().tobytes())
        assert _store_files(lib.context.blobs) == before[0] and lib.context.blobs.temp_files() == []


def test_read_only_blob_store_gives_storage_error_and_changes_nothing(
    lib: Library, base_dir: Path, tmp_path: Path
) -> None:
    first = make_adapter(base_dir, tmp_path / "first", seed=7)
    second = make_adapter(base_dir, tmp_path / "second", seed=8)
    with tmpfs(lib.context.blobs.root, size="4m"):
        lib.add(first, name="first")
        before = _store_files(lib.context.blobs), [e.name for e in lib.experts()]
        _read_only(lib.context.blobs.root)
        with pytest.raises(StorageError, match="read-only file system") as e:
            lib.add(second, name="second")
        assert e.value.location == str(lib.context.blobs.root)
        result = CliRunner().invoke(cli, ["-L", str(lib.path), "add", str(second), "--name", "second"])
        assert result.exit_code == 13 and "read-only" in result.output, result.output
        with pytest.raises(StorageError, match="read-only"):
            lib.context.blobs.put_bytes(b"anything new")
        assert (_store_files(lib.context.blobs), [x.name for x in lib.experts()]) == before
        assert lib.context.blobs.temp_files() == []


def test_gc_grace_0_taking_a_derived_experts_staging_folder_is_blobs_removed(
    lib: Library, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merge (or GenKnowSub) writes the derived adapter into a ``.derive-*`` folder in the library
    first; ``gc --grace 0`` beside it removes that folder. The merge then fails with
    :class:`BlobsRemovedError` (exit 9, "run it again"), not a raw ``FileNotFoundError``, records
    nothing, and succeeds when run again."""
    from libstore.errors import BlobsRemovedError
    from libstore.store import derived

    for i in range(2):
        lib.add(make_adapter(base_dir, tmp_path / f"t{i}", seed=40 + i), name=f"t{i}")
    before = [e.name for e in lib.summaries()]
    real_save = derived.save_tensors

    def save_then_gc(*args: object, **kwargs: object) -> None:
        real_save(*args, **kwargs)  # type: ignore[arg-type]
        lib.gc(grace_s=0)  # a gc that counts nobody as writing

    monkeypatch.setattr(derived, "save_tensors", save_then_gc)
    with pytest.raises(BlobsRemovedError, match="run the operation again"):
        lib.merge(["t0", "t1"], name="m")
    assert [e.name for e in lib.summaries()] == before
    monkeypatch.setattr(derived, "save_tensors", real_save)
    assert lib.merge(["t0", "t1"], name="m").name == "m"
    assert lib.verify().ok
