"""Issue 4: Arrow prototypes of stored experts, cached per content hash (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from libstore import Library
from libstore.errors import NotFoundError, ValidationError
from libstore.lowrank.prototypes import (
    EXACT_METHOD_VERSION,
    exact_prototypes,
    peft_prototypes,
)
from libstore.ops.prototypes import PROTOTYPE_FORMAT
from libstore.ops.tensors import load_expert_tensors
from libstore.store.safetensors_io import load_tensors, read_header
from tests.factories import make_adapter


def _blobs(lib: Library) -> set[str]:
    return {p.name for p in (lib.path / "blobs").rglob("*") if p.is_file()}


@pytest.fixture
def lib3(library: Library, base_dir: Path, tmp_path: Path) -> Library:
    """Two rank-4 experts and one rank-8 expert (two distinct module shapes)."""
    library.add(make_adapter(base_dir, tmp_path / "a", r=4, seed=1), name="a")
    library.add(make_adapter(base_dir, tmp_path / "b", r=4, seed=2), name="b")
    library.add(make_adapter(base_dir, tmp_path / "c", r=8, alpha=16, seed=3), name="c")
    return library


def test_compute_caches_and_second_call_computes_nothing(lib3: Library) -> None:
    first = lib3.compute_prototypes()
    assert first.computed == ("a", "b", "c") and first.cached == ()
    # every module of a and b is (4, 32) x (32, 4) and stacks into one call; c's rank 8 is another
    assert first.batched_calls == 2
    assert (first.method, first.method_version, first.params) == ("exact", EXACT_METHOD_VERSION, {"top_n": 1})
    blobs = _blobs(lib3)
    second = lib3.compute_prototypes()
    assert second.computed == () and second.cached == ("a", "b", "c") and second.batched_calls == 0
    assert _blobs(lib3) == blobs
    # a query computes only for what it matches, and loading does not recompute either
    assert lib3.compute_prototypes("a").cached == ("a",)
    assert set(lib3.prototypes("kind=task")) == {"a", "b", "c"}
    assert _blobs(lib3) == blobs


def test_cached_vectors_equal_exact_prototypes_of_stored_tensors(lib3: Library) -> None:
    lib3.compute_prototypes()
    for name in ("a", "c"):
        e = lib3.get(name)
        cached = lib3.prototypes(name)[name]
        assert cached.expert_sha256 == e.sha256 and set(cached.modules) == set(e.modules)
        tensors = load_expert_tensors(lib3.context, e, dtype=torch.float32)
        for m, (A, B) in tensors.items():
            want = exact_prototypes(A, B, e.scale, top_n=1)
            got = cached.modules[m]
            assert got.vectors.shape == (1, 32) and got.values.shape == (1,)
            assert got.vectors.dtype == torch.float32
            torch.testing.assert_close(got.vectors, want.vectors, atol=1e-6, rtol=0)
            torch.testing.assert_close(got.values, want.values, atol=1e-6, rtol=1e-6)
            # and it is the top right singular vector of the dense ΔW
            dense = e.scale * (B.double() @ A.double())
            _, s, vh = torch.linalg.svd(dense)
            assert abs(float(vh[0] @ got.vectors[0].double())) == pytest.approx(1.0, abs=1e-5)
            assert float(got.values[0]) == pytest.approx(float(s[0]), rel=1e-5)


def test_blob_format(lib3: Library) -> None:
    lib3.compute_prototypes("a", top_n=2)
    (entry,) = [c for c in lib3.prototype_cache() if c.params == {"top_n": 2}]
    assert entry.experts == ("a",) and entry.expert_sha256 == lib3.get("a").sha256
    path = lib3.context.blobs.path(entry.blob_sha256)
    header = read_header(path)
    assert header.metadata["format"] == PROTOTYPE_FORMAT
    assert header.metadata["method"] == "exact"
    assert header.metadata["method_version"] == str(EXACT_METHOD_VERSION)
    assert json.loads(header.metadata["params"]) == {"top_n": 2}
    assert header.metadata["expert_sha256"] == entry.expert_sha256
    modules = sorted(lib3.get("a").modules)
    assert set(header.tensors) == {f"{k}::{m}" for m in modules for k in ("vectors", "values")}
    t = load_tensors(path)
    m = modules[0]
    assert t[f"vectors::{m}"].shape == (2, 32) and t[f"vectors::{m}"].dtype == torch.float32
    assert t[f"values::{m}"].shape == (2,) and t[f"values::{m}"].dtype == torch.float32
    assert bool(t[f"values::{m}"][0] >= t[f"values::{m}"][1])


def test_changed_weights_miss_the_cache_rename_keeps_it(
    lib3: Library, base_dir: Path, tmp_path: Path
) -> None:
    lib3.compute_prototypes()
    old = lib3.get("a").sha256
    lib3.rename("a", "a2")
    assert lib3.compute_prototypes().computed == ()  # keyed by content, not name

    lib3.remove("a2")
    lib3.add(make_adapter(base_dir, tmp_path / "a_new", r=4, seed=42), name="a2")
    report = lib3.compute_prototypes()
    assert report.computed == ("a2",) and report.cached == ("b", "c")
    assert report.batched_calls == 1
    # the old weights' cache is now an orphan, and ``stale`` says so
    orphans = lib3.stale().caches
    assert [c.expert_sha256 for c in orphans] == [old]


def test_method_and_params_are_part_of_the_key(lib3: Library) -> None:
    lib3.compute_prototypes()
    two = lib3.compute_prototypes(top_n=2)
    assert two.computed == ("a", "b", "c")
    peft = lib3.compute_prototypes("a b", method="peft", seed=3)
    assert peft.computed == ("a", "b") and peft.params == {"iters": 15, "eps": 1e-8, "seed": 3}
    assert lib3.compute_prototypes("a", method="peft", seed=3).computed == ()
    assert lib3.compute_prototypes("a", method="peft", seed=4).computed == ("a",)

    e = lib3.get("b")
    tensors = load_expert_tensors(lib3.context, e, dtype=torch.float32)
    got = lib3.prototypes("b", method="peft", seed=3)["b"]
    for m, (A, B) in tensors.items():
        want = peft_prototypes(A, B, e.scale, seed=3)
        assert torch.equal(got.modules[m].vectors, want.vectors[0:1].reshape(1, -1))
    tops = lib3.prototypes("c", top_n=2)["c"]
    for p in tops.modules.values():
        assert p.vectors.shape == (2, 32)
        torch.testing.assert_close(p.vectors @ p.vectors.T, torch.eye(2), atol=1e-5, rtol=0)


def test_same_weights_share_one_computation(library: Library, base_dir: Path, tmp_path: Path) -> None:
    src = make_adapter(base_dir, tmp_path / "x", seed=7)
    library.add(src, name="x")
    library.add(src, name="x_copy")
    report = library.compute_prototypes()
    assert report.computed == ("x", "x_copy") and report.batched_calls == 1
    assert len(library.prototype_cache()) == 1
    assert library.prototype_cache()[0].experts == ("x", "x_copy")


def test_modules_and_errors(lib3: Library) -> None:
    m = sorted(lib3.get("a").modules)[1]
    only = lib3.prototypes("a", modules=[m])["a"]
    assert list(only.modules) == [m]
    with pytest.raises(NotFoundError, match="no LoRA module 'nope'"):
        lib3.prototypes("a", modules=["nope"])
    with pytest.raises(NotFoundError, match="no expert matches"):
        lib3.compute_prototypes("kind=general")
    with pytest.raises(NotFoundError, match="no expert named 'typo' matches 'a typo'"):
        lib3.compute_prototypes("a typo")
    with pytest.raises(ValidationError, match="top_n=5 but module .* has rank 4"):
        lib3.compute_prototypes("a", top_n=5)
    with pytest.raises(ValidationError, match="unknown prototype method"):
        lib3.compute_prototypes("a", method="svd")
    with pytest.raises(ValidationError, match="use method 'exact' for top_n > 1"):
        lib3.compute_prototypes("a", method="peft", top_n=2)
    assert [c.params for c in lib3.prototype_cache()] == [{"top_n": 1}]  # nothing half-written


def test_stacked_prototypes_for_the_router(lib3: Library) -> None:
    from libstore.ops.prototypes import stacked

    experts = [lib3.get("c"), lib3.get("a")]
    st = stacked(lib3.context, experts)
    m = min(lib3.get("a").modules)
    assert st[m].shape == (2, 1, 32)
    assert torch.equal(st[m][0], lib3.prototypes("c")["c"].modules[m].vectors)
    assert torch.equal(st[m][1], lib3.prototypes("a")["a"].modules[m].vectors)


@pytest.mark.parametrize("db_url", [None], ids=["sqlite"])
def test_memory_batches_and_double_record(lib3: Library) -> None:
    from libstore.catalog import prototypes as cache
    from libstore.ops.prototypes import PrototypeOptions, compute

    report = compute(
        lib3.context, "a b", options=PrototypeOptions(device="cpu"), batch_bytes=1
    )  # one expert per batch
    assert report.computed == ("a", "b") and report.batched_calls == 2 and report.device == "cpu"
    (entry,) = [c for c in lib3.prototype_cache() if c.experts == ("a",)]
    with lib3.context.catalog.write() as s:
        again = cache.record(
            s,
            expert_sha256=entry.expert_sha256,
            method="exact",
            method_version=entry.method_version,
            params=entry.params,
            blob_sha256=entry.blob_sha256,
            blob_size=1,
        )
    assert again is False and len(lib3.prototype_cache()) == 2


def test_values_follow_each_experts_scale(library: Library, base_dir: Path, tmp_path: Path) -> None:
    """Issue 12 item 3: experts sharing a weights file but not their lora_alpha share the cached
    vectors (a positive scale does not change them), and each gets the singular values of its own ΔW."""
    library.add(make_adapter(base_dir, tmp_path / "lo", seed=1, alpha=8), name="lo")
    library.add(make_adapter(base_dir, tmp_path / "hi", seed=1, alpha=32, use_rslora=True), name="hi")
    lo, hi = library.get("lo"), library.get("hi")
    assert lo.sha256 == hi.sha256 and lo.scale != hi.scale
    for first in ("hi", "lo"):  # whichever expert is computed first, both come out right
        for top_n in (1, 2):
            got = library.prototypes(first, top_n=top_n) | library.prototypes("lo hi", top_n=top_n)
            for e in (lo, hi):
                for m, (A, B) in load_expert_tensors(library.context, e, dtype=torch.float64).items():
                    dense = e.scale * (B @ A)
                    want = torch.linalg.svdvals(dense)[:top_n]
                    torch.testing.assert_close(
                        got[e.name].modules[m].values.double(), want, rtol=1e-5, atol=1e-6
                    )
                    _, _, vh = torch.linalg.svd(dense)
                    cos = (vh[:top_n] * got[e.name].modules[m].vectors.double()).sum(-1).abs()
                    torch.testing.assert_close(cos, torch.ones(top_n, dtype=torch.float64), atol=1e-5, rtol=0)
        with library.context.catalog.write() as s:  # start over for the other order
            from libstore.catalog.models import PrototypeCacheRow

            s.query(PrototypeCacheRow).delete()
    assert len(library.prototype_cache()) == 0


def test_the_cache_lists_prototype_sets_as_the_manifest_carries_them(lib3: Library) -> None:
    """``prototype_cache`` returns ``types.PrototypeSet`` (the one type the catalog, the API and the
    manifest share): its size is the blob's, and the experts that have its weights come with it
    without making two listings of one set unequal."""
    import dataclasses

    from libstore.types import PrototypeSet

    lib3.compute_prototypes()
    entries = lib3.prototype_cache()
    assert sorted(e.experts for e in entries) == [("a",), ("b",), ("c",)]
    for e in entries:
        assert type(e) is PrototypeSet
        assert e.size == lib3.context.blobs.size(e.blob_sha256) > 0
        assert dataclasses.replace(e, experts=()) == e
