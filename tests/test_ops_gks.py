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
    assert lin.derivation is not None
    d = lin.derivation.derivation
    assert (d.method, d.method_version, d.params) == ("gks-param", 1, {"mode": "param"})
    assert res.lineage == d  # the record the expert carries is the one lineage wraps
    assert [(p.parent.role, p.parent.name, p.parent.sha256, p.status) for p in lin.derivation.parents] == [
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
    assert gkslib.lineage("a_x").derivation.derivation.params["energy_kept"] == 1.0

    trunc = gkslib.subtract_general(general="kind=general", experts="a", mode="delta", rank=2, suffix="_t")
    assert gkslib.get("a_t").rank == 2
    kept = total = 0.0
    for m, d in _dense(gkslib, "a_t").items():
        u, s, vh = torch.linalg.svd(want[m])
        torch.testing.assert_close(d, (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)
        kept += float((s[:2] ** 2).sum())
        total += float((s**2).sum())
    params = gkslib.lineage("a_t").derivation.derivation.params
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
    assert gkslib.lineage("a_res").derivation.parents[0].parent.sha256 == gkslib.get("a").sha256


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
    assert [(p.parent.name, p.status, p.current_sha256) for p in parents][2] == ("g2", "gone", None)


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


def test_same_weights_other_alpha_get_their_own_residuals(
    library: Library, base_dir: Path, tmp_path: Path
) -> None:
    """Issue 12 item 3: a derivation is keyed on everything that defines ΔW (weights *and* scale),
    so experts sharing a weights file but not their lora_alpha never share a residual."""
    library.add(make_adapter(base_dir, tmp_path / "lo", seed=1, alpha=8), name="lo", tasks=["t"])
    library.add(make_adapter(base_dir, tmp_path / "hi", seed=1, alpha=32), name="hi", tasks=["t"])
    for i in (1, 2):
        library.add(make_adapter(base_dir, tmp_path / f"g{i}", seed=10 + i), name=f"g{i}", kind="general")
    lo, hi = library.get("lo"), library.get("hi")
    assert lo.sha256 == hi.sha256 and (lo.scale, hi.scale) == (2.0, 8.0)  # one weights file, two ΔW
    g = [_tensors(library, n, torch.float64) for n in ("g1", "g2")]
    scale_g = [library.get(n).scale for n in ("g1", "g2")]
    for mode in ("param", "delta"):
        report = library.subtract_general(
            general="kind=general", experts="lo hi", mode=mode, suffix=f"_{mode}"
        )
        assert report.created == (f"hi_{mode}", f"lo_{mode}") and report.reused == ()
        for name in ("lo", "hi"):
            s = library.get(name).scale
            want = {}
            for m, (A, B) in _tensors(library, name, torch.float64).items():
                if mode == "param":
                    mean_A = (g[0][m][0] + g[1][m][0]) / 2
                    mean_B = (g[0][m][1] + g[1][m][1]) / 2
                    want[m] = s * (B - mean_B) @ (A - mean_A)
                else:
                    mean = sum(sg * x[m][1] @ x[m][0] for sg, x in zip(scale_g, g, strict=True)) / 2
                    want[m] = s * B @ A - mean
            got = _dense(library, f"{name}_{mode}")
            for m in want:
                torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)
        again = library.subtract_general(
            general="kind=general", experts="lo hi", mode=mode, suffix=f"_{mode}"
        )
        assert again.reused == (f"hi_{mode}", f"lo_{mode}")
    assert library.stale().empty


@sqlite_only
def test_catalog_from_before_delta_keys_is_upgraded(library: Library, base_dir: Path, tmp_path: Path) -> None:
    """A catalog written before derivations were keyed on ΔW (revisions before 0003: keys over the parents'
    weights sha256, prototype values of s·B·A under method version 1) keeps working after the upgrade:
    its derivations are re-keyed (a rerun reuses them), stale cache entries are gone, and an expert
    with the same weights but another alpha is not served the old results."""
    from sqlalchemy import text

    from libstore.catalog import migrate
    from libstore.catalog.revisions import VERSION_TABLE
    from libstore.ops.derive import OUTPUT_PARAMS, inputs_key

    library.add(make_adapter(base_dir, tmp_path / "lo", seed=1, alpha=8), name="lo", tasks=["t"])
    for i in (1, 2):
        library.add(make_adapter(base_dir, tmp_path / f"g{i}", seed=10 + i), name=f"g{i}", kind="general")
    library.subtract_general(general="kind=general", experts="lo")
    library.merge(["lo", "g1"], name="m")
    library.compute_prototypes("lo")
    old_keys, new_keys = {}, {}
    for name in ("lo_res", "m"):
        d = library.get(name).lineage
        assert d is not None
        inputs = {k: v for k, v in d.params.items() if k not in OUTPUT_PARAMS}
        old_keys[name] = inputs_key(
            d.method, d.method_version, inputs, [(p.role, p.sha256) for p in d.parents]
        )
        new_keys[name] = d.inputs_key
        assert old_keys[name] != d.inputs_key
    engine = library.context.catalog.engine

    migrate.downgrade(engine, "0003")  # the later revisions' own changes undone first
    with engine.begin() as conn:  # what libstore before this revision wrote
        for name, key in old_keys.items():
            conn.execute(
                text(
                    "UPDATE derivations SET inputs_key = :k "
                    "WHERE child_id = (SELECT id FROM experts WHERE name = :n)"
                ),
                {"k": key, "n": name},
            )
        conn.execute(text("UPDATE prototype_cache SET method_version = 1"))
        conn.execute(text(f"UPDATE {VERSION_TABLE} SET version_num = '0002'"))
    path = library.path
    library.close()

    lib = Library.open(path)
    try:
        assert {n: lib.get(n).lineage.inputs_key for n in ("lo_res", "m")} == new_keys  # type: ignore[union-attr]
        assert lib.prototype_cache() == []  # values of s·B·A of whichever expert came first: deleted
        assert lib.stale().empty
        assert lib.subtract_general(general="kind=general", experts="lo").reused == ("lo_res",)
        assert lib.merge(["lo", "g1"], name="m").sha256 == lib.get("m").sha256
        lib.add(make_adapter(base_dir, tmp_path / "hi", seed=1, alpha=32), name="hi", tasks=["t"])
        assert lib.get("hi").sha256 == lib.get("lo").sha256
        assert lib.subtract_general(general="kind=general", experts="hi").created == ("hi_res",)
        e = lib.get("hi")
        got = lib.prototypes("hi")["hi"]
        for m, (A, B) in _tensors(lib, "hi", torch.float64).items():
            want = torch.linalg.svdvals(e.scale * (B @ A))[:1]
            torch.testing.assert_close(got.modules[m].values.double(), want, rtol=1e-5, atol=1e-6)
    finally:
        lib.close()


def test_parent_scale_changed_with_same_weights_is_stale(gkslib: Library) -> None:
    """A parent whose lora_alpha changed but not its weights (a pull can do that) has another ΔW:
    its children are stale, and a rerun does not reuse them."""
    from sqlalchemy import text

    gkslib.subtract_general(general="kind=general", experts="kind=task")
    assert gkslib.stale().empty
    with gkslib.context.catalog.engine.begin() as conn:
        conn.execute(text("UPDATE experts SET alpha = 32 WHERE name = 'a'"))
    report = gkslib.stale()
    assert [(s.name, s.method) for s in report.experts] == [("a_res", "gks-param")]
    assert "LoRA scale" in report.experts[0].reasons[0]
    assert gkslib.lineage("a_res").is_stale and not gkslib.lineage("b_res").is_stale
    with pytest.raises(AlreadyExistsError, match="--refresh") as err:
        gkslib.subtract_general(general="kind=general", experts="a")
    assert (err.value.what, err.value.name) == ("expert", "a_res")
