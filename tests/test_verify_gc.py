"""``verify`` finds every kind of disagreement between catalog and blob store, ``--repair`` fixes only
what is safe, and ``gc`` reclaims exactly what nothing references — never a blob an import has
stored but not yet committed (grace period, re-use claims, tombstones)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from libstore import Library
from libstore.catalog.models import BlobRow, ExpertRow, PrototypeCacheRow
from libstore.cli import cli
from libstore.errors import BlobsRemovedError
from libstore.ops import maintenance
from libstore.ops.problems import (
    BadPrototypeCache,
    BlobRowWithoutFile,
    BlobSizeMismatch,
    CorruptBlob,
    DanglingReference,
    ExpertMismatch,
    MissingBlob,
    OrphanedPrototypeCache,
    StrayFile,
    TempLeftover,
    UnrecordedBlob,
    UntrackedBlob,
    VerifyReport,
)
from libstore.store.blob_upkeep import TOMB_PREFIX
from libstore.types import PrototypeSet
from tests.factories import make_adapter

if TYPE_CHECKING:
    import torch

SQLITE_ONLY = pytest.mark.parametrize("db_url", [None], ids=["sqlite"])
HOUR = 3600


def _stock(lib: Library, base_dir: Path, tmp: Path) -> dict[str, Path]:
    """Task experts a, b; general g1, g2; residuals a_res, b_res; exact prototypes of all."""
    src = {}
    for i, (name, kind) in enumerate([("a", "task"), ("b", "task"), ("g1", "general"), ("g2", "general")]):
        src[name] = make_adapter(base_dir, tmp / "src" / name, seed=10 + i)
        lib.add(src[name], name=name, kind=kind, tags=["v1"], tasks=[name])
    lib.subtract_general(general="kind=general", experts="kind=task")
    lib.compute_prototypes()
    return src


def _codes(report: VerifyReport) -> list[str]:
    return sorted(p.code for p in report.problems)


def _blob(lib: Library, expert: str, path: str = "adapter_model.safetensors") -> str:
    return lib.get(expert).file(path).sha256


def _corrupt(path: Path) -> None:
    """Flip one byte in the middle, keeping the size (what a bad disk or a stray write does)."""
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _raw_sqlite(lib: Library) -> sqlite3.Connection:
    """A connection with foreign keys OFF: damage the catalog the way a buggy tool could."""
    conn = sqlite3.connect(lib.path / "catalog.db", isolation_level=None)
    conn.execute("PRAGMA foreign_keys=OFF")
    return conn


def _cli(lib: Library, *args: str, code: int = 0) -> str:
    result = CliRunner().invoke(cli, ["-L", str(lib.path), *args], catch_exceptions=False)
    assert result.exit_code == code, (args, result.output)
    return result.stdout


# --- verify --------------------------------------------------------------------------------------


def test_sound_library_verifies_clean(library: Library, base_dir: Path, tmp_path: Path) -> None:
    _stock(library, base_dir, tmp_path)
    report = library.verify()
    assert report.ok and report.problems == ()
    assert report.experts == 6 and report.blobs > 6 and report.bytes_hashed > 0
    assert library.gc(dry_run=True, grace_s=0).blobs == ()


@SQLITE_ONLY
def test_cli_verify_and_gc_json_and_exit_codes(library: Library, base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(base_dir, tmp_path / "src" / "x", seed=3)
    library.add(src, name="x")
    out = json.loads(_cli(library, "verify", "--json"))
    assert out["ok"] is True and out["errors"] == 0 and out["experts"] == 1
    assert "Verified 1 experts" in _cli(library, "verify")
    _corrupt(library.context.blobs.path(_blob(library, "x")))
    out = json.loads(_cli(library, "verify", "--json", code=7))
    (p,) = [p for p in out["problems"] if p["code"] == "corrupt_blob"]
    assert p["severity"] == "error" and "expert 'x'" in p["message"] and p["repair"] is None
    assert "corrupt_blob" in _cli(library, "verify", code=7)
    library.remove("x")
    dry = json.loads(_cli(library, "gc", "--dry-run", "--grace", "0", "--json"))
    assert dry["dry_run"] is True and len(dry["blobs"]) == 2
    assert "Kept 2" in _cli(library, "gc", "--grace", "90m")
    assert "Removed 2 blob(s)" in _cli(library, "gc", "--grace", "0s")
    assert list(library.context.blobs) == []
    result = CliRunner().invoke(cli, ["-L", str(library.path), "gc", "--grace", "soon"])
    assert result.exit_code == 2 and "not a duration" in result.output


def test_verify_and_gc_import_torch_only_to_recompute_prototypes(
    library: Library, base_dir: Path, tmp_path: Path
) -> None:
    """``verify`` and ``gc`` of a library without prototype caches stay torch-free (fast)."""
    library.add(make_adapter(base_dir, tmp_path / "src" / "x", seed=3), name="x")
    script = textwrap.dedent(f"""
        import sys
        from libstore import Library
        lib = Library.open({str(library.path)!r}, db_url={library.context.catalog.url!r})
        assert lib.verify().ok and lib.gc(dry_run=True).blobs == ()
        assert "torch" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr


def test_corrupt_expert_blob_is_quarantined_never_deleted(
    library: Library, base_dir: Path, tmp_path: Path
) -> None:
    src = _stock(library, base_dir, tmp_path)
    sha = _blob(library, "a")
    _corrupt(library.context.blobs.path(sha))
    report = library.verify()
    assert not report.ok
    (bad,) = report.errors
    assert isinstance(bad, CorruptBlob) and bad.sha256 == sha and "expert 'a'" in bad.referenced_by[0]

    repaired = library.verify(repair=True)
    assert not repaired.ok  # the bytes are gone for good: only a re-add can bring them back
    assert "a" in {e.name for e in library.experts()}
    (q,) = (library.path / maintenance.QUARANTINE_DIR).iterdir()
    assert q.name.startswith(sha)
    again = library.verify()
    assert [type(p) for p in again.errors] == [MissingBlob]

    library.add(src["a"], name="a_again")  # the blob is missing, so its bytes are stored anew
    library.remove("a_again")
    assert library.verify().ok


def test_missing_blobs_and_record_mismatches_are_errors_repair_leaves_alone(
    library: Library,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    _stock(library, base_dir, tmp_path)
    weights = _blob(library, "b")
    library.context.blobs.delete(weights)
    with library.context.catalog.write() as s:
        s.execute(update(ExpertRow).where(ExpertRow.name == "g1").values(rank=8, dtype="float16"))
        s.execute(update(ExpertRow).where(ExpertRow.name == "g2").values(alpha=99.0))
        row = s.scalar(select(ExpertRow).where(ExpertRow.name == "a_res"))
        row.module_shapes = {**row.module_shapes, "model.layers.9.mlp.up_proj": [32, 64, 4]}
    report = library.verify()
    (missing,) = [p for p in report.errors if isinstance(p, MissingBlob)]
    assert missing.sha256 == weights and missing.referenced_by == ("expert 'b' (adapter_model.safetensors)",)
    mism = {(p.expert, p.what) for p in report.errors if isinstance(p, ExpertMismatch)}
    assert {
        ("g1", "rank"),
        ("g1", "dtype"),
        ("g1", "rank (config r)"),
        ("g2", "alpha (config lora_alpha)"),
        ("a_res", "modules"),
        ("a_res", "base model fit of model.layers.9.mlp.up_proj"),
    } <= mism
    before = [e.name for e in library.experts()]
    after = library.verify(repair=True)
    assert not after.ok and [e.name for e in library.experts()] == before


def test_bad_prototype_caches_are_dropped_and_recomputed(
    library: Library, base_dir: Path, tmp_path: Path
) -> None:
    _stock(library, base_dir, tmp_path)
    entries = {c.experts[0]: c for c in library.prototype_cache()}
    library.context.blobs.delete(entries["a"].blob_sha256)  # missing
    _corrupt(library.context.blobs.path(entries["b"].blob_sha256))  # corrupt
    with library.context.catalog.write() as s:  # g1's entry points at g2's prototype file
        s.execute(
            update(PrototypeCacheRow)
            .where(PrototypeCacheRow.expert_sha256 == entries["g1"].expert_sha256)
            .values(blob_sha256=entries["g2"].blob_sha256)
        )
    report = library.verify()
    assert sorted(type(p).__name__ for p in report.errors) == [
        "BadPrototypeCache",
        "CorruptBlob",
        "MissingBlob",
    ]
    (bad,) = [p for p in report.errors if isinstance(p, BadPrototypeCache)]
    assert "made for weights" in bad.reason

    repaired = library.verify(repair=True)
    assert repaired.ok and all(r.fixed for r in repaired.repairs if r.problem.severity == "error")
    assert {n for c in library.prototype_cache() for n in c.experts} == {"a_res", "b_res", "g2"}
    assert library.compute_prototypes().computed == ("a", "b", "g1")
    assert library.verify().ok
    library.gc(grace_s=0)
    assert library.verify().problems == ()


def _poison(lib: Library, entry: PrototypeSet, change: Callable[[str, torch.Tensor], torch.Tensor]) -> str:
    """Store a prototype file with the entry's own metadata but changed tensors, and point the entry
    at it: what a lying remote or a buggy writer leaves (the right format under the right hash)."""
    from libstore.store.safetensors_io import load_tensors, read_header, save_tensors

    path = lib.context.blobs.path(entry.blob_sha256)
    meta = read_header(path).metadata
    tensors = {k: change(k, t) for k, t in load_tensors(path).items()}
    out = save_tensors(tensors, lib.path.parent / "poisoned.safetensors", metadata=meta)
    ref = lib.context.blobs.put_file(out)
    blob = ref.sha256
    with lib.context.catalog.write() as s:
        s.add(BlobRow(sha256=blob, size=ref.size))
        s.execute(
            update(PrototypeCacheRow)
            .where(PrototypeCacheRow.blob_sha256 == entry.blob_sha256)
            .values(blob_sha256=blob)
        )
    return blob


def test_poisoned_prototype_caches_are_errors_and_repair_drops_them(
    library: Library, base_dir: Path, tmp_path: Path
) -> None:
    """A cached prototype set that is not the prototypes of its weights — other vectors, or values at
    another scale — is an error even though its format, hash and metadata are right; repair drops it
    and it is recomputed. Sound caches of every method pass (exact top 2, PEFT's power iteration)."""
    import torch

    _stock(library, base_dir, tmp_path)
    library.compute_prototypes(top_n=2)
    library.compute_prototypes(method="peft", seed=3)
    assert library.verify().ok
    exact = {
        c.experts[0]: c for c in library.prototype_cache() if c.method == "exact" and c.params["top_n"] == 1
    }
    peft = {c.experts[0]: c for c in library.prototype_cache() if c.method == "peft"}
    gen = torch.Generator().manual_seed(0)

    def other_vectors(key: str, t: torch.Tensor) -> torch.Tensor:
        if not key.startswith("vectors::"):
            return t
        v = torch.randn(t.shape, generator=gen)
        return v / v.norm(dim=-1, keepdim=True)

    poisoned = {
        _poison(library, exact["a"], other_vectors),
        _poison(
            library, exact["b"], lambda k, t: t * 4 if k.startswith("values::") else t
        ),  # alpha 32, not 8
        _poison(library, peft["g1"], other_vectors),
    }
    report = library.verify()
    bad = [p for p in report.errors if isinstance(p, BadPrototypeCache)]
    assert {p.blob_sha256 for p in bad} == poisoned and len(report.errors) == 3
    assert all("not the prototypes of its weights" in p.reason for p in bad)
    assert {p.method for p in bad} == {"exact", "peft"}

    repaired = library.verify(repair=True)
    assert repaired.ok and {type(r.problem) for r in repaired.repairs if r.fixed} >= {BadPrototypeCache}
    assert library.compute_prototypes().computed == ("a", "b")
    assert library.compute_prototypes(method="peft", seed=3).computed == ("g1",)
    assert library.verify().ok
    library.gc(grace_s=0)
    assert library.verify().problems == ()


@SQLITE_ONLY
def test_rows_pointing_at_nothing_are_repaired_as_on_delete_would(
    library: Library,
    base_dir: Path,
    tmp_path: Path,
) -> None:
    _stock(library, base_dir, tmp_path)
    weights = _blob(library, "b")
    conn = _raw_sqlite(library)
    conn.execute("DELETE FROM blobs WHERE sha256 = ?", (weights,))  # referenced by b's files
    conn.execute("DELETE FROM experts WHERE name = 'g1'")  # parent of both residuals
    conn.execute("DELETE FROM experts WHERE name = 'a_res'")  # a derived child
    conn.execute("UPDATE blobs SET size = size + 1 WHERE sha256 = ?", (_blob(library, "a"),))
    conn.close()
    report = library.verify()
    codes = _codes(report)
    assert "unrecorded_blob" in codes and "blob_size_mismatch" in codes
    dangling = {(p.table, p.column, p.on_delete) for p in report.problems if isinstance(p, DanglingReference)}
    assert {
        ("expert_files", "expert_id", "CASCADE"),
        ("expert_tags", "expert_id", "CASCADE"),
        ("expert_tasks", "expert_id", "CASCADE"),
        ("derivations", "child_id", "CASCADE"),
        ("derivation_parents", "parent_id", "SET NULL"),
    } <= dangling
    assert not report.ok

    repaired = library.verify(repair=True)
    assert repaired.ok, [p.message for p in repaired.errors]
    fixed = {type(r.problem) for r in repaired.repairs if r.fixed}
    assert {UnrecordedBlob, BlobSizeMismatch, DanglingReference} <= fixed
    report = library.verify()
    assert report.ok and all(p.severity == "warning" for p in report.problems)
    lineage = library.lineage("b_res").derivation
    assert {p.parent.name: p.status for p in lineage.parents}["g1"] == "gone"
    library.gc(grace_s=0)
    assert library.verify().problems == ()


def test_harmless_leftovers_are_warnings(library: Library, base_dir: Path, tmp_path: Path) -> None:
    """Temp files, unrecorded blobs, rows without files, stray files, orphaned caches: verify passes;
    repair removes old temp files only; gc collects the rest."""
    _stock(library, base_dir, tmp_path)
    blobs = library.context.blobs
    shard = blobs.path(_blob(library, "a")).parent
    old_tmp, young_tmp = shard / ".tmp-1-old", shard / ".tmp-2-young"
    old_tmp.write_bytes(b"half a blob")
    young_tmp.write_bytes(b"a blob being written")
    _age(old_tmp, 2 * HOUR)
    derive = library.path / ".derive-abc"
    derive.mkdir()
    (derive / "adapter_model.safetensors").write_bytes(b"x")
    _age(derive / "adapter_model.safetensors", 2 * HOUR)
    _age(derive, 2 * HOUR)
    proto_tmp = library.path / ".prototypes-99-abc.safetensors"
    proto_tmp.write_bytes(b"x")
    _age(proto_tmp, 2 * HOUR)
    (library.path / ".tmp" / "pull-1-abc" / "dl").mkdir(parents=True)  # a pull in flight
    (shard / "notes.txt").write_text("stray")
    untracked = blobs.put_bytes(b"stored by an import that has not committed").sha256
    library.remove("b")  # its prototype cache is orphaned now; its blobs stay until gc

    report = library.verify()
    assert report.ok
    kinds = {type(p) for p in report.problems}
    assert kinds == {TempLeftover, StrayFile, UntrackedBlob, OrphanedPrototypeCache}
    assert {p.sha256 for p in report.problems if isinstance(p, UntrackedBlob)} == {untracked}

    repaired = library.verify(repair=True)
    removed = {r.problem.path for r in repaired.repairs if isinstance(r.problem, TempLeftover)}
    assert removed == {str(p.relative_to(library.path)) for p in (old_tmp, derive, proto_tmp)}
    assert young_tmp.exists() and (library.path / ".tmp" / "pull-1-abc").exists()

    gone = library.gc()  # default grace: only old things go
    assert gone.blobs == () and len(gone.caches) == 1 and untracked in gone.kept
    assert library.gc(grace_s=0).blobs  # b's blobs, its prototypes and the untracked blob
    assert not young_tmp.exists() and untracked not in blobs
    report = library.verify()
    assert [type(p) for p in report.problems] == [StrayFile]


def test_blob_row_without_file_is_a_warning_repair_deletes_it(
    library: Library, base_dir: Path, tmp_path: Path
) -> None:
    _stock(library, base_dir, tmp_path)
    sha = _blob(library, "a")
    library.remove("a_res")
    library.remove("a")
    library.context.blobs.delete(sha)
    report = library.verify()
    assert report.ok and BlobRowWithoutFile in {type(p) for p in report.problems}
    library.verify(repair=True)
    with library.context.catalog.read() as s:
        assert s.get(BlobRow, sha) is None


# --- gc ------------------------------------------------------------------------------------------


def test_gc_removes_exactly_what_nothing_references(library: Library, base_dir: Path, tmp_path: Path) -> None:
    _stock(library, base_dir, tmp_path)
    blobs = library.context.blobs
    weights, config = _blob(library, "b"), _blob(library, "b", "adapter_config.json")
    proto = next(c.blob_sha256 for c in library.prototype_cache() if c.experts == ("b",))
    library.remove("b")
    before = sorted(blobs)

    dry = library.gc(dry_run=True, grace_s=0)
    assert set(dry.blobs) == {weights, proto} and len(dry.caches) == 1
    assert sorted(blobs) == before and len(library.prototype_cache()) == 6  # nothing changed

    young = library.gc()  # everything is younger than the default grace period
    assert young.blobs == () and {weights, proto} <= set(young.kept)

    report = library.gc(grace_s=0)
    assert set(report.blobs) == {weights, proto} and report.bytes_freed > 0
    assert weights not in blobs and proto not in blobs and config in blobs  # config is shared
    with library.context.catalog.read() as s:
        assert s.get(BlobRow, weights) is None and s.get(BlobRow, config) is not None
    assert library.verify().problems == ()
    assert library.gc(grace_s=0).blobs == ()
    # the removed expert's residual still works; its caches are recomputed if asked
    assert library.prototypes("b_res")["b_res"].modules


@SQLITE_ONLY
def test_gc_keeps_blobs_of_imports_in_flight(library: Library) -> None:
    """An import stores blobs before its transaction commits: gc must leave them alone, whether
    written just now or re-used (deduplicated) just now from an old unreferenced copy."""
    blobs = library.context.blobs
    fresh = blobs.put_bytes(b"written by an import in flight").sha256
    old = blobs.put_bytes(b"left behind long ago").sha256
    _age(blobs.path(old), 2 * HOUR)
    reused = blobs.put_bytes(b"left behind, re-used right now").sha256
    _age(blobs.path(reused), 2 * HOUR)
    mtime = blobs.path(reused).stat().st_mtime_ns
    assert blobs.put_bytes(b"left behind, re-used right now").sha256 == reused  # dedup: a claim
    assert blobs.path(reused).stat().st_mtime_ns == mtime  # content and mtime untouched

    report = library.gc()
    assert report.blobs == (old,) and set(report.kept) == {fresh, reused}
    assert fresh in blobs and reused in blobs and old not in blobs


@SQLITE_ONLY
def test_gc_never_deletes_a_blob_claimed_while_it_deletes(
    library: Library, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last race: a writer re-uses the blob between gc's age check and its deletion."""
    blobs = library.context.blobs
    data = b"an old unreferenced blob"
    sha = blobs.put_bytes(data).sha256
    real_rename = os.rename

    def claim_then_rename(src: object, dst: object) -> None:  # the writer wins by a hair
        blobs.put_bytes(data)  # finds the blob and re-uses it: a claim
        real_rename(src, dst)

    _age(blobs.path(sha), 2 * HOUR)
    monkeypatch.setattr(os, "rename", claim_then_rename)
    report = library.gc()
    assert report.blobs == () and report.kept == (sha,)
    assert blobs.verify(sha) and not list(blobs.path(sha).parent.glob(".gc-*"))

    def rename_then_write(src: object, dst: object) -> None:  # the writer comes just after
        real_rename(src, dst)
        blobs.put_bytes(data)  # finds no blob: stores it anew

    _age(blobs.path(sha), 2 * HOUR)
    monkeypatch.setattr(os, "rename", rename_then_write)
    library.gc()
    assert blobs.verify(sha) and not list(blobs.path(sha).parent.glob(".gc-*"))


def test_gc_with_no_grace_never_deletes_a_blob_an_import_records(
    library: Library, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import stores its blobs inside the transaction that records them, and gc deletes inside its
    own write transaction: even ``--grace 0`` cannot take a blob an import records. Here the import
    re-uses the very blobs gc is deleting, at the worst moment: it waits for gc's transaction, then
    finds them gone and stores them anew."""
    src = make_adapter(base_dir, tmp_path / "src" / "x", seed=5)
    library.add(src, name="x")
    library.remove("x")  # its two blobs are unreferenced now
    real_rename = os.rename
    imports: list[threading.Thread] = []

    def import_then_rename(a: object, b: object) -> None:
        if not imports:  # as gc takes the first file, an import of the same adapter starts
            imports.append(threading.Thread(target=library.add, args=(src,), kwargs={"name": "x"}))
            imports[0].start()
            imports[0].join(timeout=2)  # it finishes unless it has to wait for gc's transaction
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", import_then_rename)
    library.gc(grace_s=0)
    monkeypatch.undo()
    imports[0].join(timeout=60)
    assert [e.name for e in library.experts()] == ["x"]
    assert library.verify().ok
    assert all(library.context.blobs.verify(f.sha256) for f in library.get("x").files)


def test_claims_mark_blobs_in_use_and_report_those_gc_took(library: Library) -> None:
    """``claim`` keeps a stored blob from gc for the grace period; ``claim_all`` (what writers call in
    the transaction that records their blobs) raises ``BlobsRemovedError`` naming the ones gone."""
    blobs = library.context.blobs
    old = blobs.put_bytes(b"found in the store by a pull").sha256
    _age(blobs.path(old), 2 * HOUR)
    gone = blobs.put_bytes(b"staged, then taken by gc").sha256
    assert blobs.claim(old) and not blobs.claim("0" * 64)
    st = blobs.stat(old)
    assert st is not None and time.time() - st.claimed_at < 60
    assert library.gc().kept == tuple(sorted([old, gone]))
    assert library.gc(grace_s=0).blobs == tuple(sorted([old, gone]))
    assert blobs.put_bytes(b"found in the store by a pull").sha256 == old
    with pytest.raises(BlobsRemovedError) as err:
        blobs.claim_all([old, gone])
    assert err.value.sha256s == (gone,) and err.value.exit_code == 9


@SQLITE_ONLY
def test_gc_settles_tombstones_left_by_a_crash(library: Library) -> None:
    blobs = library.context.blobs
    young = blobs.put_bytes(b"claimed just before the crash").sha256
    old = blobs.put_bytes(b"really garbage").sha256
    for sha in (young, old):
        p = blobs.path(sha)
        os.rename(p, p.with_name(f"{TOMB_PREFIX}{sha}-dead"))
    _age(blobs.path(old).with_name(f"{TOMB_PREFIX}{old}-dead"), 2 * HOUR)
    assert library.verify().ok  # tombstones are temp leftovers, not errors
    report = library.gc()
    assert young in blobs and old not in blobs and len(report.temp) == 2
    assert not list(blobs.root.rglob(f"{TOMB_PREFIX}*"))


def test_gc_rejects_a_negative_grace(library: Library) -> None:
    with pytest.raises(ValueError, match="grace"):
        library.gc(grace_s=-1)


def test_repair_on_a_folder_library_sharing_a_catalog_keeps_the_others_rows(
    library: Library, base_dir: Path, tmp_path: Path
) -> None:
    """Alice's experts and prototype caches are in one catalog that Bob's library folder opens too
    (issue 14: Bob's ``verify --repair`` deleted Alice's caches). Bob's folder lacks Alice's blobs, so
    his verify reports them missing, but his repair changes no shared row; Alice's library still
    verifies clean."""
    _stock(library, base_dir, tmp_path)
    caches = library.prototype_cache()
    assert caches
    bob = Library.init(tmp_path / "bob", db_url=library.context.catalog.url)
    report = bob.verify()
    assert {type(p).__name__ for p in report.errors} == {"MissingBlob"}
    repaired = bob.verify(repair=True)
    assert repaired.repairs and not any(r.fixed for r in repaired.repairs if r.problem.severity == "error")
    assert all("shares its catalog" in r.action for r in repaired.repairs if r.problem.severity == "error")
    bob.close()
    assert library.prototype_cache() == caches
    assert library.verify().ok
