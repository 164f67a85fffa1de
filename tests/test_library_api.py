"""Issue 3 end to end through the Python API, on SQLite and on PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

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
