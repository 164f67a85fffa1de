"""Issue 4: similarity matrices and ΔW-space merges of stored experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from libstore import Library
from libstore.errors import (
    AlreadyExistsError,
    IncompatibleExpertsError,
    ValidationError,
)
from libstore.ops.tensors import load_expert_tensors
from tests.factories import load_base, make_adapter

sqlite_only = pytest.mark.parametrize("db_url", [None], ids=["sqlite"])


def _dense(lib: Library, name: str) -> dict[str, torch.Tensor]:
    e = lib.get(name)
    t = load_expert_tensors(lib.context, e, dtype=torch.float64)
    return {m: e.scale * (B @ A) for m, (A, B) in t.items()}


def _cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()))


@pytest.fixture
def trio(library: Library, base_dir: Path, tmp_path: Path) -> Library:
    """a (r4), b (r4, rsLoRA), c (r8): same modules, different ranks and scales."""
    library.add(make_adapter(base_dir, tmp_path / "a", r=4, alpha=8, seed=1), name="a", tasks=["ta"])
    library.add(
        make_adapter(base_dir, tmp_path / "b", r=4, alpha=8, use_rslora=True, seed=2), name="b", tasks=["tb"]
    )
    library.add(make_adapter(base_dir, tmp_path / "c", r=8, alpha=4, seed=3), name="c")
    return library


@sqlite_only
def test_similarity_matches_dense_cosines(trio: Library, tmp_path: Path) -> None:
    names = ("a", "b", "c")
    delta = trio.similarity("a b c")
    assert delta.names == names and delta.metric == "delta"
    dense = {n: torch.cat([d.flatten() for _, d in sorted(_dense(trio, n).items())]) for n in names}
    for i, x in enumerate(names):
        assert delta.values[i][i] == pytest.approx(1.0)
        for j, y in enumerate(names):
            assert delta.values[i][j] == pytest.approx(_cos(dense[x], dense[y]), abs=1e-5)
            assert delta.values[i][j] == delta.values[j][i]
    assert delta["a", "c"] == delta.values[0][2]

    flat = trio.similarity(["a", "b"], metric="flat")
    vec = {}
    for n in ("a", "b"):
        t = load_expert_tensors(trio.context, trio.get(n), dtype=torch.float64)
        vec[n] = torch.cat([x.flatten() for m in sorted(t) for x in t[m]])
    assert flat.values[0][1] == pytest.approx(_cos(vec["a"], vec["b"]), abs=1e-5)

    png = trio.plot_similarity(delta, tmp_path / "plots" / "sim.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@sqlite_only
def test_similarity_is_gauge_invariant_flat_is_not(library: Library, base_dir: Path, tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file, save_file

    src = make_adapter(base_dir, tmp_path / "x", seed=4)
    library.add(src, name="x")
    twin = tmp_path / "x_gauge"
    twin.mkdir()
    (twin / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    t = load_file(src / "adapter_model.safetensors")
    for k in [k for k in t if ".lora_A." in k]:
        g = 2.0 * torch.eye(4) + 0.1 * torch.ones(4, 4)
        kb = k.replace(".lora_A.", ".lora_B.")
        t[k], t[kb] = (g @ t[k]).contiguous(), (t[kb] @ torch.linalg.inv(g)).contiguous()
    save_file(t, twin / "adapter_model.safetensors", metadata={"format": "pt"})
    library.add(twin, name="x_gauge")
    assert json.loads((twin / "adapter_config.json").read_text())["r"] == 4
    assert library.similarity("x x_gauge")["x", "x_gauge"] == pytest.approx(1.0, abs=1e-5)
    assert library.similarity("x x_gauge", metric="flat")["x", "x_gauge"] < 0.99


@sqlite_only
def test_similarity_errors(trio: Library, base_dir: Path, tmp_path: Path) -> None:
    trio.add(make_adapter(base_dir, tmp_path / "k", targets=("k_proj",), seed=5), name="k")
    with pytest.raises(IncompatibleExpertsError, match="'a' and 'k' adapt different modules"):
        trio.similarity()
    with pytest.raises(ValidationError, match="unknown metric"):
        trio.similarity("a b", metric="l2")


def test_exact_merge_is_the_average_of_updates(trio: Library) -> None:
    e = trio.merge(["a", "b", "c"], name="abc")
    assert (e.kind, e.rank, e.scale) == ("merged", 16, 1.0) and e.tasks == ("ta", "tb")
    parts = [_dense(trio, n) for n in ("a", "b", "c")]
    for m, d in _dense(trio, "abc").items():
        torch.testing.assert_close(d, sum(p[m] for p in parts) / 3, atol=1e-5, rtol=1e-5)
    lin = e.lineage
    assert lin is not None and lin.method == "merge"
    assert [(p.role, p.name) for p in lin.parents] == [("expert", "a"), ("expert", "b"), ("expert", "c")]
    assert lin.params["weights"] == pytest.approx([1 / 3] * 3) and lin.params["rank"] is None
    assert lin.params["energy_kept"] == 1.0


@sqlite_only
def test_weighted_truncated_merge(trio: Library) -> None:
    e = trio.merge(["a", "c"], name="ac4", rank=4, weights=[0.75, 0.25])
    assert e.rank == 4
    a, c = _dense(trio, "a"), _dense(trio, "c")
    kept = total = 0.0
    for m, d in _dense(trio, "ac4").items():
        u, s, vh = torch.linalg.svd(0.75 * a[m] + 0.25 * c[m])
        torch.testing.assert_close(d, (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5, rtol=1e-5)
        kept += float((s[:4] ** 2).sum())
        total += float((s**2).sum())
    assert e.lineage.params["energy_kept"] == pytest.approx(kept / total, rel=1e-4)
    assert e.lineage.params["weights"] == [0.75, 0.25]
    assert e.metadata["energy_kept"] == e.lineage.params["energy_kept"]


@sqlite_only
def test_merged_expert_loads_with_peft(trio: Library, base_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    trio.merge(["a", "b"], name="ab", rank=3)
    out = trio.export("ab", tmp_path / "ab")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    model = PeftModel.from_pretrained(load_base(base_dir), str(out)).eval()
    dense = load_base(base_dir)
    with torch.no_grad():
        for m, d in _dense(trio, "ab").items():
            dense.get_submodule(m).weight += d.float()
        torch.testing.assert_close(
            model(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-5
        )


def test_merge_reuse_conflicts_and_refresh(trio: Library, base_dir: Path, tmp_path: Path) -> None:
    first = trio.merge(["a", "b"], name="ab")
    again = trio.merge(["a", "b"], name="ab")
    assert again.sha256 == first.sha256 and again.created_at == first.created_at
    with pytest.raises(AlreadyExistsError, match="computed from other inputs.*--refresh"):
        trio.merge(["a", "b"], name="ab", rank=2)
    with pytest.raises(AlreadyExistsError, match="already exists and is not a merge"):
        trio.merge(["a", "b"], name="c")

    trio.remove("b")
    trio.add(make_adapter(base_dir, tmp_path / "b2", seed=22), name="b")
    assert [s.name for s in trio.stale().experts] == ["ab"]
    fresh = trio.merge(["a", "b"], name="ab", refresh=True)
    assert fresh.sha256 != first.sha256 and trio.stale().experts == ()
    assert [c.name for c in trio.lineage("a").children] == ["ab"]


@sqlite_only
def test_merge_errors(trio: Library, base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="2 weights for 3 experts"):
        trio.merge(["a", "b", "c"], name="x", weights=[0.5, 0.5])
    with pytest.raises(ValidationError, match="listed twice"):
        trio.merge(["a", "a"], name="x")
    with pytest.raises(ValidationError, match="cannot replace its input"):
        trio.merge(["a", "b"], name="a")
    trio.add(make_adapter(base_dir, tmp_path / "k", targets=("k_proj",), seed=5), name="k")
    with pytest.raises(IncompatibleExpertsError, match="adapt different modules"):
        trio.merge(["a", "k"], name="x")
    assert trio.experts("kind=merged") == []


def test_merge_keyed_on_scale_not_only_weights(library: Library, base_dir: Path, tmp_path: Path) -> None:
    """Issue 12 item 3: experts with one weights file but other lora_alpha are other merge inputs."""
    library.add(make_adapter(base_dir, tmp_path / "lo", seed=1, alpha=8), name="lo")
    library.add(make_adapter(base_dir, tmp_path / "hi", seed=1, alpha=32), name="hi")
    library.add(make_adapter(base_dir, tmp_path / "c", seed=3), name="c")
    assert library.get("lo").sha256 == library.get("hi").sha256
    c = _dense(library, "c")

    def check(name: str, parent: str) -> None:
        p = _dense(library, parent)
        for m, d in _dense(library, name).items():
            torch.testing.assert_close(d, (p[m] + c[m]) / 2, atol=1e-5, rtol=1e-5)

    library.merge(["lo", "c"], name="m_lo")
    library.merge(["hi", "c"], name="m_hi")
    check("m_lo", "lo")
    check("m_hi", "hi")
    with pytest.raises(AlreadyExistsError, match="computed from other inputs"):
        library.merge(["hi", "c"], name="m_lo")  # not "the same merge": hi's ΔW is not lo's
    library.merge(["hi", "c"], name="m_lo", refresh=True)
    check("m_lo", "hi")


@sqlite_only
def test_similarity_streams_within_any_budget(trio: Library) -> None:
    """``similarity`` reads the experts one group of modules at a time (the clustering path): any
    memory budget gives the matrix of the whole experts."""
    from libstore.ops.similarity import SimilarityOptions, similarity

    for metric in ("delta", "flat"):
        names = "a b c" if metric == "delta" else "a b"  # flat compares raw parameters: equal ranks
        whole = similarity(trio.context, names, options=SimilarityOptions(metric=metric))
        for budget in (1, 4096):
            streamed = similarity(
                trio.context, names, options=SimilarityOptions(metric=metric), budget_bytes=budget
            )
            assert streamed.names == whole.names
            for row_s, row_w in zip(streamed.values, whole.values, strict=True):
                assert row_s == pytest.approx(row_w, abs=1e-6)
    with pytest.raises(IncompatibleExpertsError, match="--metric delta"):
        trio.similarity("a c", metric="flat")  # ranks 4 and 8: refused with the way out
