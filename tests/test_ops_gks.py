"""Issue 4: GenKnowSub residuals as stored experts — PEFT equality, reuse, staleness, refresh."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from libstore import Library
from libstore.errors import (
    AlreadyExistsError,
    BaseModelMismatchError,
    IncompatibleExpertsError,
    ValidationError,
)
from libstore.lowrank.gks import subtract_general_param
from libstore.ops.tensors import load_expert_tensors
from tests.factories import load_base, make_adapter, make_base_model

PREFIX = "base_model.model."
sqlite_only = pytest.mark.parametrize("db_url", [None], ids=["sqlite"])  # pure tensor checks


def _blobs(lib: Library) -> set[str]:
    return {p.name for p in (lib.path / "blobs").rglob("*") if p.is_file()}


def _tensors(lib: Library, name: str, dtype: torch.dtype = torch.float32) -> dict:
    return load_expert_tensors(lib.context, lib.get(name), dtype=dtype)


def _dense(lib: Library, name: str) -> dict[str, torch.Tensor]:
    e = lib.get(name)
    return {m: e.scale * (B @ A) for m, (A, B) in _tensors(lib, name, torch.float64).items()}


@pytest.fixture
def gkslib(library: Library, base_dir: Path, tmp_path: Path) -> Library:
    """Tasks a, b and general experts g1, g2, all rank 4 on q_proj and v_proj."""
    for i, n in enumerate(("a", "b")):
        library.add(make_adapter(base_dir, tmp_path / n, seed=1 + i), name=n, tasks=[n])
    for i, n in enumerate(("g1", "g2")):
        library.add(make_adapter(base_dir, tmp_path / n, seed=10 + i), name=n, kind="general")
    return library


def test_param_mode_stores_peft_equal_residuals_with_lineage(gkslib: Library) -> None:
    report = gkslib.subtract_general(general="kind=general", experts="kind=task")
    assert report.created == ("a_res", "b_res") and report.general == ("g1", "g2")
    res = gkslib.get("a_res")
    a = gkslib.get("a")
    assert (res.kind, res.rank, res.alpha, res.use_rslora) == ("residual", a.rank, a.alpha, False)
    assert res.tasks == ("a",) and res.dtype == "float32"
    assert [e.name for e in gkslib.experts("kind=residual")] == ["a_res", "b_res"]

    g = [_tensors(gkslib, "g1"), _tensors(gkslib, "g2")]
    for m, (A, B) in _tensors(gkslib, "a").items():
        want_A, want_B = subtract_general_param(A, B, [x[m][0] for x in g], [x[m][1] for x in g])
        got_A, got_B = _tensors(gkslib, "a_res")[m]
        assert torch.equal(got_A, want_A) and torch.equal(got_B, want_B)

    lin = gkslib.lineage("a_res")
    d = lin.derivation
    assert d is not None and (d.method, d.method_version, d.params) == ("gks-param", 1, {"mode": "param"})
    assert [(p.role, p.name, p.sha256, p.status) for p in d.parents] == [
        ("expert", "a", a.sha256, "ok"),
        ("general", "g1", gkslib.get("g1").sha256, "ok"),
        ("general", "g2", gkslib.get("g2").sha256, "ok"),
    ]
    assert not lin.is_stale and res.lineage is not None and res.lineage.method == "gks-param"
    assert [(c.name, c.method, c.role) for c in gkslib.lineage("g1").children] == [
        ("a_res", "gks-param", "general"),
        ("b_res", "gks-param", "general"),
    ]
    assert gkslib.stale().empty


@sqlite_only
def test_param_residual_equals_peft_create_arrow_model(
    gkslib: Library, base_dir: Path, tmp_path: Path
) -> None:
    from peft import ArrowConfig, create_arrow_model

    gkslib.subtract_general(general="g1 g2", experts="a b")
    paths = {n: str(gkslib.export(n, tmp_path / "x" / n)) for n in ("a", "b", "g1", "g2")}
    model = create_arrow_model(
        load_base(base_dir),
        [paths["a"], paths["b"]],
        ArrowConfig(top_k=1, use_gks=True, rng_seed=0),
        general_adapter_paths=[paths["g1"], paths["g2"]],
    )
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 3]]))  # PEFT subtracts at the first forward
    checked = 0
    for full, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "task_0" in mod.lora_A:
            m = full.removeprefix(PREFIX)
            for adapter, name in (("task_0", "a_res"), ("task_1", "b_res")):
                A, B = _tensors(gkslib, name)[m]
                assert torch.equal(mod.lora_A[adapter].weight, A)
                assert torch.equal(mod.lora_B[adapter].weight, B)
            checked += 1
    assert checked == 4


@sqlite_only
def test_exported_residual_loads_with_peft_and_matches_dense(
    gkslib: Library, base_dir: Path, tmp_path: Path
) -> None:
    from peft import PeftModel

    gkslib.subtract_general(general="kind=general", experts="a", mode="delta", rank=3, suffix="_d")
    out = gkslib.export("a_d", tmp_path / "a_d")
    ids = torch.tensor([[1, 7, 3, 11, 2]])
    peft_model = PeftModel.from_pretrained(load_base(base_dir), str(out)).eval()
    dense = load_base(base_dir)
    with torch.no_grad():
        for m, delta in _dense(gkslib, "a_d").items():
            dense.get_submodule(m).weight += delta.float()
        want = dense(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@sqlite_only
def test_delta_mode_is_exact_and_truncation_reports_energy(
    gkslib: Library, base_dir: Path, tmp_path: Path
) -> None:
    # delta mode accepts other ranks: a rank-8 general expert
    gkslib.add(make_adapter(base_dir, tmp_path / "g8", r=8, alpha=4, seed=20), name="g8", kind="general")
    exact = gkslib.subtract_general(general="kind=general", experts="a", mode="delta", suffix="_x")
    assert exact.created == ("a_x",) and exact.method == "gks-delta"
    res = gkslib.get("a_x")
    assert res.rank == 4 + 4 + 4 + 8 and res.scale == 1.0
    a = _dense(gkslib, "a")
    gens = [_dense(gkslib, n) for n in ("g1", "g2", "g8")]
    want = {m: a[m] - sum(g[m] for g in gens) / 3 for m in a}
    for m, d in _dense(gkslib, "a_x").items():
        torch.testing.assert_close(d, want[m], atol=1e-5, rtol=1e-5)
    assert gkslib.lineage("a_x").derivation.params["energy_kept"] == 1.0

    trunc = gkslib.subtract_general(general="kind=general", experts="a", mode="delta", rank=2, suffix="_t")
    assert gkslib.get("a_t").rank == 2
    kept = total = 0.0
    for m, d in _dense(gkslib, "a_t").items():
        u, s, vh = torch.linalg.svd(want[m])
        torch.testing.assert_close(d, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)
        kept += float((s[:2] ** 2).sum())
        total += float((s**2).sum())
    params = gkslib.lineage("a_t").derivation.params
    assert params["rank"] == 2 and params["energy_kept"] == pytest.approx(kept / total, rel=1e-4)
    assert 0 < params["energy_kept_min"] <= params["energy_kept"] < 1
    assert trunc.items[0].energy_kept == params["energy_kept"]
    assert gkslib.get("a_t").metadata["energy_kept"] == params["energy_kept"]


def test_rerun_reuses_changed_parent_is_stale_and_refresh_recomputes_in_place(
    gkslib: Library, base_dir: Path, tmp_path: Path
) -> None:
    gkslib.subtract_general(general="kind=general", experts="kind=task")
    gkslib.compute_prototypes("a_res")
    blobs = _blobs(gkslib)
    again = gkslib.subtract_general(general="kind=general", experts="kind=task")
    assert again.reused == ("a_res", "b_res") and again.created == ()
    assert _blobs(gkslib) == blobs

    old = gkslib.get("a_res")
    gkslib.remove("a")
    gkslib.add(make_adapter(base_dir, tmp_path / "a_v2", seed=77), name="a", tasks=["a"])
    report = gkslib.stale()
    assert [(s.name, s.method) for s in report.experts] == [("a_res", "gks-param")]
    assert "expert 'a' changed" in report.experts[0].reasons[0]
    assert gkslib.lineage("a_res").is_stale

    blobs = _blobs(gkslib)
    with pytest.raises(AlreadyExistsError, match="--refresh"):
        gkslib.subtract_general(general="kind=general", experts="kind=task")
    assert _blobs(gkslib) == blobs  # refused before computing anything

    fresh = gkslib.subtract_general(general="kind=general", experts="kind=task", refresh=True)
    assert fresh.refreshed == ("a_res",) and fresh.reused == ("b_res",)
    new = gkslib.get("a_res")
    assert new.sha256 != old.sha256 and new.created_at == old.created_at  # same record, new files
    g = [_tensors(gkslib, "g1"), _tensors(gkslib, "g2")]
    for m, (A, B) in _tensors(gkslib, "a").items():
        want_A, _ = subtract_general_param(A, B, [x[m][0] for x in g], [x[m][1] for x in g])
        assert torch.equal(_tensors(gkslib, "a_res")[m][0], want_A)
    after = gkslib.stale()
    assert after.experts == ()
    # the old residual's cached prototypes are now orphaned
    assert [c.expert_sha256 for c in after.caches] == [old.sha256]
    assert gkslib.lineage("a_res").derivation.parents[0].sha256 == gkslib.get("a").sha256


def test_gone_parent_and_downstream_staleness(gkslib: Library) -> None:
    gkslib.subtract_general(general="kind=general", experts="kind=task")
    gkslib.merge(["a_res", "b_res"], name="ab")
    gkslib.remove("g2")
    stale = {s.name: s.reasons for s in gkslib.stale().experts}
    assert stale == {
        "a_res": ("general 'g2' is gone",),
        "b_res": ("general 'g2' is gone",),
        "ab": ("expert 'a_res' is stale",),
    }
    parents = gkslib.lineage("a_res").derivation.parents
    assert [(p.name, p.status, p.current_sha256) for p in parents][2] == ("g2", "gone", None)


def test_errors(gkslib: Library, base_dir: Path, tmp_path: Path) -> None:
    gkslib.add(make_adapter(base_dir, tmp_path / "r8", r=8, seed=5), name="r8")
    with pytest.raises(IncompatibleExpertsError, match="rank 4 but 'r8' rank 8.*--mode delta"):
        gkslib.subtract_general(general="kind=general", experts="kind=task")
    gkslib.add(make_adapter(base_dir, tmp_path / "qk", targets=("q_proj", "k_proj"), seed=6), name="qk")
    with pytest.raises(IncompatibleExpertsError, match="adapt different modules"):
        gkslib.subtract_general(general="kind=general", experts="qk", mode="delta")
    with pytest.raises(ValidationError, match="--mode delta --rank"):
        gkslib.subtract_general(general="kind=general", experts="a", rank=2)
    with pytest.raises(ValidationError, match="matches only general experts"):
        gkslib.subtract_general(general="kind=general", experts="g1")
    with pytest.raises(ValidationError, match="unknown GenKnowSub mode"):
        gkslib.subtract_general(general="kind=general", experts="a", mode="avg")
    gkslib.add(make_adapter(base_dir, tmp_path / "taken", seed=8), name="a_res")
    with pytest.raises(AlreadyExistsError, match="'a_res' already exists and is not a GenKnowSub"):
        gkslib.subtract_general(general="kind=general", experts="a")

    other = make_base_model(tmp_path / "base64", hidden_size=64, intermediate_size=64)
    gkslib.add_base("wide", str(other))
    gkslib.add(make_adapter(other, tmp_path / "w", seed=9), name="w", base="wide")
    with pytest.raises(BaseModelMismatchError, match="different base models"):
        gkslib.subtract_general(general="kind=general", experts="w")
    assert gkslib.experts("kind=residual") == []
