"""Issue 3 end to end through the Python API, on SQLite and on PostgreSQL."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from libstore import Library
from libstore.errors import (
    AlreadyExistsError,
    BaseModelMismatchError,
    InvalidNameError,
    LibraryExistsError,
    LibraryNotFoundError,
    NotFoundError,
    UnsafeFileError,
    ValidationError,
)
from libstore.store.blobs import sha256_file
from tests.factories import make_adapter, make_base_model


def _snapshot(lib: Library) -> tuple[list, list[str]]:
    """What a failed operation must leave unchanged: the records and the blob files."""
    experts = [(e.name, e.sha256, e.tags, e.tasks) for e in lib.experts()]
    blobs = sorted(str(p.relative_to(lib.path)) for p in (lib.path / "blobs").rglob("*") if p.is_file())
    return experts, blobs


def test_add_list_show_export_roundtrip(library: Library, base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(base_dir, tmp_path / "arc_easy", r=4, alpha=8, seed=1)
    e = library.add(src, name="arc_easy", kind="task", tasks=["arc_easy"], tags=["v1"])
    assert (e.name, e.kind, e.base_model, e.rank, e.alpha) == ("arc_easy", "task", "tiny", 4, 8.0)
    assert e.sha256 == sha256_file(src / "adapter_model.safetensors")
    assert set(e.modules) == {f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")}
    shape = e.modules["model.layers.0.self_attn.q_proj"]
    assert (shape.in_features, shape.out_features, shape.rank) == (32, 32, 4)
    assert e.tasks == ("arc_easy",) and e.tags == ("v1",) and e.dtype == "float32"
    assert library.get("arc_easy") == e
    assert [x.name for x in library.experts("kind=task tag=v1")] == ["arc_easy"]
    assert library.experts("kind=general") == []
    assert [x.name for x in library.experts("task=arc_easy")] == ["arc_easy"]
    assert [x.name for x in library.experts("arc_*")] == ["arc_easy"]

    out = library.export("arc_easy", tmp_path / "out")
    assert (out / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    assert sha256_file(out / "adapter_model.safetensors") == e.sha256


def test_exported_expert_loads_with_peft(library: Library, base_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = make_adapter(base_dir, tmp_path / "a", seed=3)
    library.add(src, name="a")
    out = library.export("a", tmp_path / "out")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), src).eval()
    got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)
        assert not torch.allclose(base(ids).logits, got(ids).logits)  # the adapter does something


def test_same_adapter_twice_is_one_blob(library: Library, base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(base_dir, tmp_path / "a", seed=5)
    a = library.add(src, name="a")
    b = library.add(src, name="b")
    assert a.sha256 == b.sha256
    blobs = [p for p in (library.path / "blobs").rglob("*") if p.is_file()]
    assert len(blobs) == 2  # one config + one weights file, shared


def test_import_dir_all_or_nothing_and_rerun(library: Library, base_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    for i, name in enumerate(["t1", "t2", "t3"]):
        make_adapter(base_dir, root / name, seed=10 + i)
    report = library.import_dir(root, kind="task", tags=["batch"], task_from_name=True)
    assert sorted(e.name for e in report.added) == ["t1", "t2", "t3"]
    assert library.get("t2").tasks == ("t2",)
    again = library.import_dir(root, kind="task")
    assert again.added == () and sorted(again.skipped) == ["t1", "t2", "t3"]

    make_adapter(base_dir, root / "t4", seed=20)
    (root / "t5").mkdir()
    (root / "t5" / "adapter_config.json").write_text("{not json")
    before = _snapshot(library)
    with pytest.raises(ValidationError, match="t5"):
        library.import_dir(root)
    assert _snapshot(library) == before  # t4 was not imported either


def test_import_dir_gives_the_gc_back_as_it_found_it(
    library: Library, base_dir: Path, tmp_path: Path
) -> None:
    """import-dir freezes the objects alive at its start out of the cyclic GC while it runs (full
    collections over the whole process were a fifth of its time), unfreezes them after, also when
    it fails, and leaves a host process's own freeze alone."""
    import gc

    make_adapter(base_dir, tmp_path / "adapters" / "a", seed=30)
    assert len(library.import_dir(tmp_path / "adapters").added) == 1 and gc.get_freeze_count() == 0
    with pytest.raises(ValidationError):
        library.import_dir(tmp_path / "empty")
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        assert library.import_dir(tmp_path / "adapters").skipped == ("a",)
        assert gc.get_freeze_count() > 0  # still the host's (an unfreeze would have emptied it)
    finally:
        gc.unfreeze()


def test_import_dir_rerun_skips_by_hash_before_copying(
    library: Library, base_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A re-run hashes the already-recorded folders in place: nothing is copied into staging for
    them; a folder whose weights changed under a recorded name is still refused, and a new folder
    next to them is still copied, validated and added."""
    from libstore.store.blobs import BlobStore

    root = tmp_path / "adapters"
    for i in range(3):
        make_adapter(base_dir, root / f"t{i}", seed=10 + i)
    library.import_dir(root)
    staged: list[str] = []
    real = BlobStore.stage_file

    def counting(self: BlobStore, src: str, **kw: object) -> object:
        staged.append(Path(src).parent.name)
        return real(self, src, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(BlobStore, "stage_file", counting)
    again = library.import_dir(root)
    assert sorted(again.skipped) == ["t0", "t1", "t2"] and staged == []
    make_adapter(base_dir, root / "t3", seed=13)
    report = library.import_dir(root, tags=["new"])
    assert [e.name for e in report.added] == ["t3"] and staged == ["t3"]
    assert library.get("t3").tags == ("new",) and len(library.experts()) == 4
    make_adapter(base_dir, root / "t1", seed=99)  # other weights under a recorded name
    with pytest.raises(AlreadyExistsError, match="t1"):
        library.import_dir(root)
    assert staged == ["t3", "t1"] and len(library.experts()) == 4


def test_failed_imports_change_nothing(library: Library, base_dir: Path, tmp_path: Path) -> None:
    library.add(make_adapter(base_dir, tmp_path / "ok", seed=1), name="ok", tags=["keep"])
    before = _snapshot(library)

    pickled = make_adapter(base_dir, tmp_path / "pickled", seed=2)
    (pickled / "adapter_model.safetensors").unlink()
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UnsafeFileError, match="adapter_model.bin"):
        library.add(pickled, name="pickled")

    other = make_base_model(tmp_path / "wide", hidden_size=48)
    wrong_shape = make_adapter(other, tmp_path / "wide_adapter", seed=3)
    with pytest.raises(BaseModelMismatchError, match="q_proj"):
        library.add(wrong_shape, name="wide", allow_base_mismatch=True)

    with pytest.raises(AlreadyExistsError):
        library.add(make_adapter(base_dir, tmp_path / "dup", seed=4), name="ok")
    for bad in ["", "../x", "a/b", "x\x00", "\u0430rc", "x" * 97]:
        with pytest.raises(InvalidNameError):
            library.add(tmp_path / "ok", name=bad)
    assert _snapshot(library) == before


def test_base_model_mismatch_needs_override(library: Library, base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(base_dir, tmp_path / "a", seed=1)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BaseModelMismatchError, match="--allow-base-mismatch"):
        library.add(src, name="a")
    assert library.add(src, name="a", allow_base_mismatch=True).name == "a"


def test_remove_rename_tag_untag(library: Library, base_dir: Path, tmp_path: Path) -> None:
    library.add(make_adapter(base_dir, tmp_path / "a", seed=1), name="a", tags=["v1"])
    library.add(make_adapter(base_dir, tmp_path / "b", seed=2), name="b", kind="general")
    assert library.tag("kind=general", "gen", "v2") == ["b"]
    assert library.get("b").tags == ("gen", "v2")
    assert library.untag("b", "v2") == ["b"]
    assert library.get("b").tags == ("gen",)
    assert dict(library.tags()) == {"gen": 1, "v1": 1, "v2": 0}
    library.rename("a", "a2")
    with pytest.raises(NotFoundError):
        library.get("a")
    assert library.get("a2").tags == ("v1",)
    with pytest.raises(AlreadyExistsError):
        library.rename("a2", "b")
    library.remove("a2")
    assert [e.name for e in library.experts()] == ["b"]
    with pytest.raises(NotFoundError, match="libstore ls"):
        library.remove("a2")


def test_open_init_errors_and_reopen(tmp_path: Path, base_dir: Path) -> None:
    with pytest.raises(LibraryNotFoundError, match="libstore init"):
        Library.open(tmp_path / "nope")
    lib = Library.init(tmp_path / "lib")
    with pytest.raises(LibraryExistsError):
        Library.init(tmp_path / "lib")
    lib.add_base("tiny", str(base_dir))
    lib.add(make_adapter(base_dir, tmp_path / "a", seed=1), name="a")
    lib.close()
    with Library.open(tmp_path / "lib") as again:
        assert [e.name for e in again.experts()] == ["a"]
        assert (tmp_path / "lib" / "catalog.db").exists()


def test_weights_are_real_peft_tensors(library: Library, base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(base_dir, tmp_path / "a", seed=9)
    e = library.add(src, name="a")
    stored = load_file(library.context.blobs.path(e.sha256))
    original = load_file(src / "adapter_model.safetensors")
    assert stored.keys() == original.keys()
    assert all(torch.equal(stored[k], original[k]) for k in stored)


def test_readers_never_see_half_written_experts(library: Library, base_dir: Path, tmp_path: Path) -> None:
    """A listing runs several statements (experts, then files, tags, tasks, lineage); with a writer
    adding and removing experts between them, every listing must still be one snapshot: no expert
    without its files or tags, on SQLite (one WAL transaction) and PostgreSQL (REPEATABLE READ)."""
    import threading
    import time

    src = make_adapter(base_dir, tmp_path / "a", seed=1)
    for i in range(20):
        library.add(src, name=f"keep{i:02d}", tags=["t"], tasks=["k"])
    writer_lib = Library.open(library.path, db_url=library.context.catalog.url)
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            i = 0
            while not stop.is_set():
                writer_lib.add(src, name=f"churn{i % 8}", tags=["t"], tasks=["k"])
                writer_lib.remove(f"churn{(i + 4) % 8}") if i >= 4 else None
                i += 1
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=write)
    thread.start()
    seen, listings = 0, 0
    try:
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline and not errors:
            for e in library.experts():
                assert len(e.files) == 2 and e.tags == ("t",) and e.tasks == ("k",), e
                seen += e.name.startswith("churn")
            listings += 1
    finally:
        stop.set()
        thread.join()
        writer_lib.close()
    assert errors == []
    assert seen > 0 and listings > 5  # the readers did meet the writer's experts


def test_errors_carry_what_and_name_and_change_nothing(
    library: Library, base_dir: Path, tmp_path: Path
) -> None:
    from libstore.errors import InUseError, QueryError

    src = make_adapter(base_dir, tmp_path / "a", seed=1)
    library.add(src, name="a")
    library.add(src, name="b")
    before = _snapshot(library)
    with pytest.raises(NotFoundError) as nf:
        library.get("nope")
    assert (nf.value.what, nf.value.name) == ("expert", "nope")
    with pytest.raises(NotFoundError) as nf:
        library.remove("nope")
    assert (nf.value.what, nf.value.name) == ("expert", "nope")
    with pytest.raises(NotFoundError) as nf:
        library.tag("nomatch*", "t")
    assert (nf.value.what, nf.value.name) == ("expert", "nomatch*")
    with pytest.raises(AlreadyExistsError) as ae:
        library.rename("a", "b")
    assert (ae.value.what, ae.value.name) == ("expert", "b")
    with pytest.raises(AlreadyExistsError) as ae:
        library.add(src, name="a")
    assert (ae.value.what, ae.value.name) == ("expert", "a")
    with pytest.raises(AlreadyExistsError) as ae:
        library.add_base("tiny", str(base_dir))
    assert (ae.value.what, ae.value.name) == ("base model", "tiny")
    with pytest.raises(NotFoundError) as nf:
        library.base("nope")
    assert (nf.value.what, nf.value.name) == ("base model", "nope")
    with pytest.raises(InUseError) as iu:
        library.remove_base("tiny")
    assert (iu.value.what, iu.value.name, iu.value.used_by, iu.value.exit_code) == (
        "base model",
        "tiny",
        ("a", "b"),
        12,
    )
    with pytest.raises(NotFoundError) as nf:
        library.add(src, name="c", kind="cluster", cluster="mbc:1")
    assert (nf.value.what, nf.value.name) == ("clustering", "mbc")
    with pytest.raises(ValidationError) as ve:
        library.add(src, name="c", kind="cluster", cluster="mbc:99999999999999999999999")
    assert ve.value.field == "cluster"
    with pytest.raises(QueryError) as qe:
        library.experts("kind=lora")
    assert qe.value.query == "kind=lora"
    assert _snapshot(library) == before
    assert [b.name for b in library.bases()] == ["tiny"]


def test_import_dir_takes_allow_nonfinite(library: Library, base_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    folder = make_adapter(base_dir, tmp_path / "adapters" / "nan", seed=1)
    weights = folder / "adapter_model.safetensors"
    tensors = {k: v * float("nan") for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValidationError, match="allow-nonfinite"):
        library.import_dir(tmp_path / "adapters")
    assert library.experts() == []
    report = library.import_dir(tmp_path / "adapters", allow_nonfinite=True)
    assert [e.name for e in report.added] == ["nan"]


@pytest.mark.parametrize(
    "marker",
    [b"{not json", b"[]", b"{}", b'{"format": "1"}', b'{"format": true}', b'{"format": 0}', b"\xff\xfe\x00"],
    ids=["not-json", "list", "no-format", "string", "bool", "zero", "binary"],
)
def test_a_garbage_library_json_is_refused_untouched(tmp_path: Path, marker: bytes) -> None:
    Library.init(tmp_path / "lib").close()
    (tmp_path / "lib" / "library.json").write_bytes(marker)
    catalog = (tmp_path / "lib" / "catalog.db").read_bytes()
    with pytest.raises(LibraryNotFoundError) as e:
        Library.open(tmp_path / "lib")
    assert e.value.path == str(tmp_path / "lib") and "library.json" in str(e.value)
    assert (tmp_path / "lib" / "library.json").read_bytes() == marker
    assert (tmp_path / "lib" / "catalog.db").read_bytes() == catalog


def test_a_library_from_a_newer_libstore_is_refused_untouched(tmp_path: Path) -> None:
    from libstore.errors import SchemaError

    Library.init(tmp_path / "lib").close()
    marker = b'{"format": 2, "written_by": "libstore 9"}\n'
    (tmp_path / "lib" / "library.json").write_bytes(marker)
    catalog = (tmp_path / "lib" / "catalog.db").read_bytes()
    with pytest.raises(SchemaError) as e:
        Library.open(tmp_path / "lib")
    assert e.value.revision == "2" and e.value.exit_code == 8 and "upgrade libstore" in str(e.value)
    assert (tmp_path / "lib" / "library.json").read_bytes() == marker
    assert (tmp_path / "lib" / "catalog.db").read_bytes() == catalog
    assert not (tmp_path / "lib" / "catalog.db-wal").exists()  # the catalog was not even opened
    (tmp_path / "lib" / "library.json").write_bytes(b'{"format": 1, "note": "extra keys are kept"}')
    Library.open(tmp_path / "lib").close()
    assert (tmp_path / "lib" / "library.json").read_bytes() == b'{"format": 1, "note": "extra keys are kept"}'


@contextlib.contextmanager
def _counting_statements() -> Iterator[list[str]]:
    """Every SQL statement run meanwhile: by any engine (SQLAlchemy's ``before_cursor_execute``) and
    by the driver snapshots ``ls``/``show`` read from (``catalog/snapshots.py``)."""
    from sqlalchemy import Engine, event

    from libstore.catalog.snapshots import Snapshot

    seen: list[str] = []

    def on_execute(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        seen.append(statement)

    snapshot_rows = Snapshot._rows

    def counted(self: Snapshot, sql: str, params: Any) -> Any:
        seen.append(sql)
        return snapshot_rows(self, sql, params)

    event.listen(Engine, "before_cursor_execute", on_execute)
    Snapshot._rows = counted  # type: ignore[method-assign]  # the statements a snapshot runs, counted
    try:
        yield seen
    finally:
        Snapshot._rows = snapshot_rows  # type: ignore[method-assign]  # restored
        event.remove(Engine, "before_cursor_execute", on_execute)


def test_listing_costs_the_same_statements_for_5_or_1005_experts(
    library: Library, base_dir: Path, tmp_path: Path, db_url: str | None
) -> None:
    """No N+1: experts, files, tags, tasks, cluster links and lineage load in a fixed number of
    statements whatever the number of experts — in the Python API and in `libstore ls` (every
    output form), counted with ``before_cursor_execute``."""
    from tests.catalog_support import clone_experts
    from tests.conftest import cli_invoker

    src = make_adapter(base_dir, tmp_path / "a", seed=1)
    for i in range(4):
        library.add(src, name=f"a{i}", tags=["t", f"t{i}"], tasks=[f"task_a{i}"])
    clone_experts(library, "a0", 1, prefix="b", derive_every=1)  # cluster link, tag g0, lineage
    run = cli_invoker("-L", str(library.path), *(["--db", db_url] if db_url else []))
    forms = (["ls"], ["ls", "--json"], ["ls", "--jsonl"], ["ls", "--full"], ["ls", "--full", "--json"])

    def counts() -> list[int]:
        out = []
        for call in (library.experts, library.summaries):
            with _counting_statements() as seen:
                call()
            out.append(len(seen))
        for args in forms:
            with _counting_statements() as seen:
                run(*args)
            out.append(len(seen))
        return out

    few = counts()
    listed = library.experts()
    assert len(listed) == 5 and listed[-1].cluster == "mbc_b:0" and listed[-1].lineage is not None
    clone_experts(library, "a1", 1000, prefix="c")  # lineage on 2, clusters on 10
    many = counts()
    listed = library.experts()
    assert len(listed) == 1005 and all(len(e.files) == 2 and e.tasks for e in listed)
    assert sum(e.lineage is not None for e in listed) == 3
    assert sum(e.cluster is not None for e in listed) == 11
    summaries = library.summaries()
    assert [s.name for s in summaries] == [e.name for e in listed]
    assert sum(s.derived_by == "merge" for s in summaries) == 3
    assert many == few and max(few) <= 12 and min(few) >= 3, (few, many)
