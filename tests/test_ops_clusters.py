"""Issue 5 through the Python API: MBC clustering recorded in the catalog (SQLite and PostgreSQL).

Planted structure: K_PLANTED random centre adapters, and around each of them experts made as
centre + noise (``tests.factories.make_adapter(centre=..., noise=...)``), named so that clusters
interleave in name order (t00 → centre 0, t01 → centre 1, ...).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from libstore import Library
from libstore.catalog import repo
from libstore.errors import (
    AlreadyExistsError,
    BaseModelMismatchError,
    IncompatibleExpertsError,
    InUseError,
    NotFoundError,
    ValidationError,
)
from libstore.lowrank.clustering import cosine_matrix, mbc_features
from libstore.lowrank.similarity import delta_cosine_matrix, flatten_lora, module_groups
from libstore.ops import clusters as ops
from libstore.ops.experts import store_adapter_files
from libstore.ops.tensors import load_expert_tensors
from libstore.store.adapter import read_adapter
from libstore.types import ADAPTER_WEIGHTS, Expert
from tests.factories import make_adapter, make_base_model

K_PLANTED = 3
PER_CENTRE = 4
N = K_PLANTED * PER_CENTRE
NAMES = [f"t{j:02d}" for j in range(N)]


def planted_label(name: str) -> int:
    return int(name[1:]) % K_PLANTED


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapter folders: the planted experts, plus extras for the degenerate cases."""
    root = tmp_path_factory.mktemp("planted")
    base = make_base_model(root / "base")
    centres = [make_adapter(base, root / f"centre{c}", seed=100 + c) for c in range(K_PLANTED)]
    out = {
        n: make_adapter(base, root / "src" / n, seed=j, centre=centres[j % K_PLANTED], noise=0.02)
        for j, n in enumerate(NAMES)
    }
    out["late"] = make_adapter(base, root / "late", seed=50, centre=centres[0], noise=0.02)
    out["other"] = make_adapter(base, root / "other", seed=51)
    out["rank8"] = make_adapter(base, root / "rank8", seed=52, r=8)
    out["base48"] = make_base_model(root / "base48", hidden_size=48)
    out["foreign"] = make_adapter(out["base48"], root / "foreign", seed=53)
    return out


def _add(lib: Library, folder: Path, **kw: Any) -> Expert:
    """``lib.add`` of a module-scoped adapter: made on a copy of the fixture's base model in another
    folder, so its recorded base path differs (same weights)."""
    return lib.add(folder, allow_base_mismatch=True, **kw)


def _add_planted(lib: Library, planted: dict[str, Path]) -> None:
    for n in NAMES:
        _add(lib, planted[n], name=n, tasks=[n])


def _same_partition(c: ops.Clustering) -> bool:
    got = {m: cl.index for cl in c.record.clusters for m in cl.members}
    return all((got[a] == got[b]) == (planted_label(a) == planted_label(b)) for a in got for b in got)


# --- the main path, on SQLite and PostgreSQL -----------------------------------------------------


def test_planted_clusters_recovered_and_recorded(library: Library, planted: dict[str, Path]) -> None:
    _add_planted(library, planted)
    shas = {e.name: e.sha256 for e in library.experts()}
    for metric in ("flat", "delta"):
        c = library.cluster("kind=task", k=K_PLANTED, metric=metric, seed=0)
        rec = c.record
        assert rec.name == ("mbc-k3" if metric == "flat" else "mbc-delta-k3")
        assert _same_partition(c), [cl.members for cl in rec.clusters]
        # numbered stably: by first member in name order
        assert [cl.members[0] for cl in rec.clusters] == ["t00", "t01", "t02"]
        assert [cl.index for cl in rec.clusters] == [0, 1, 2]
        assert [cl.size for cl in c.clusters] == [PER_CENTRE] * K_PLANTED
        assert [cl.record for cl in c.clusters] == list(rec.clusters)  # the view wraps the record
        for cl in c.clusters:
            assert cl.record.tasks == cl.record.members  # each member's task is its name
            assert cl.within is not None and cl.between is not None
            assert cl.within > 0.9 and abs(cl.between) < 0.2
            assert cl.silhouette is not None and cl.silhouette > 0.8
        assert c.silhouette is not None and c.silhouette > 0.8
        # the run is recorded with every parameter and what it saw
        assert (rec.metric, rec.k, rec.seed, rec.query, rec.method) == (metric, 3, 0, "kind=task", "mbc")
        assert rec.params["n_init"] == 10 and rec.params["k"] == 3 and rec.params["n_experts"] == N
        if metric == "flat":
            assert rec.params["keep"] == 0.2 and rec.params["dim"] == 64
            assert rec.params["features_dim"] == N  # min(dim, n)
        assert rec.criterion["name"] == "given"
        assert [(i.name, i.sha256) for i in rec.inputs] == [(n, shas[n]) for n in NAMES]
        assert [(i.input, i.status) for i in c.inputs] == [(x, "ok") for x in rec.inputs]
        assert not c.stale and c.stale_reasons == () and rec.base_model == "tiny"
        assert library.clustering(rec.name) == c
    assert [c.record.name for c in library.clusterings()] == ["mbc-delta-k3", "mbc-k3"]
    with pytest.raises(AlreadyExistsError, match="clusters rm"):
        library.cluster(k=3, name="mbc-k3")


def test_auto_k_and_determinism(library: Library, planted: dict[str, Path]) -> None:
    _add_planted(library, planted)
    a = library.cluster(name="a", seed=7).record
    b = library.cluster(name="b", seed=7).record
    assert a.k == K_PLANTED and _same_partition(library.clustering("a"))
    assert a.criterion["name"] == "silhouette"
    assert a.criterion["k_range"] == list(range(2, N))  # 2..min(20, n-1)
    scores = {int(k): v for k, v in a.criterion["scores"].items()}
    assert sorted(scores) == list(range(2, N))
    assert max(scores, key=lambda k: scores[k]) == K_PLANTED
    assert a.criterion["silhouette"] == pytest.approx(scores[K_PLANTED])
    # same inputs and seed: the same record, bit for bit
    assert (a.clusters, a.criterion, a.params) == (b.clusters, b.criterion, b.params)
    d = library.cluster(name="d", metric="delta", k_range=[2, 3, 4, 5])
    assert d.record.k == K_PLANTED and d.record.criterion["k_range"] == [2, 3, 4, 5] and _same_partition(d)


def test_stale_on_added_changed_and_removed_experts(library: Library, planted: dict[str, Path]) -> None:
    _add_planted(library, planted)
    library.cluster(k=3, name="run")
    assert not library.clustering("run").stale

    _add(library, planted["late"], name="late", tasks=["late"])  # matches kind=task
    c = library.clustering("run")
    assert c.stale and c.added == ("late",) and "added since" in c.stale_reasons[0]
    assert [x.record.name for x in ops.stale_clusterings(library.context)] == ["run"]
    assert [s.name for s in library.stale().clusterings] == ["run"]
    _add(library, planted["other"], name="gen", kind="general")  # does not match: no effect
    assert library.clustering("run").added == ("late",)
    library.remove("late")
    assert not library.clustering("run").stale

    # content replaced in place (as a pull or a refresh does) -> changed
    ctx = library.context
    files = store_adapter_files(ctx, read_adapter(planted["other"], into=ctx.blobs))
    with ctx.catalog.write() as s:
        repo.replace_files(s, repo.expert_row(s, "t04"), files, ADAPTER_WEIGHTS)
    c = library.clustering("run")
    assert [(i.input.name, i.status) for i in c.inputs if i.status != "ok"] == [("t04", "changed")]
    assert c.stale and "'t04' changed" in c.stale_reasons[0]
    assert [x.record.name for x in library.clusterings() if x.stale] == ["run"]

    library.remove("t05")
    gone = [i for i in library.clustering("run").inputs if i.status == "gone"]
    assert [(i.input.name, i.current_name) for i in gone] == [("t05", None)]
    # the record still holds the run as it was
    assert "t05" in library.clustering("run").record.clusters[2].members


def test_cluster_expert_links_export_and_remove(library: Library, planted: dict[str, Path]) -> None:
    _add_planted(library, planted)
    c = library.cluster(k=3, name="mbc-k3")
    e = _add(library, planted["late"], name="c1_expert", kind="cluster", cluster="mbc-k3:1")
    assert e.kind == "cluster" and e.cluster == "mbc-k3:1"
    assert e.tasks == c.record.clusters[1].tasks == ("t01", "t04", "t07", "t10")
    assert library.clustering("mbc-k3").clusters[1].experts == ("c1_expert",)
    assert [x.name for x in library.experts("cluster=mbc-k3:1")] == ["c1_expert"]
    assert [x.name for x in library.experts("task=t07")] == ["c1_expert", "t07"]
    with pytest.raises(NotFoundError, match="0..2"):
        _add(library, planted["late"], name="c9", kind="cluster", cluster="mbc-k3:9")

    doc = json.loads(library.export_clustering("mbc-k3", "json"))
    assert doc["clustering"] == "mbc-k3" and doc["k"] == 3 and doc["metric"] == "flat"
    assert doc["stale"] is False and doc["base_model"] == "tiny"
    assert [x["cluster"] for x in doc["clusters"]] == ["mbc-k3:0", "mbc-k3:1", "mbc-k3:2"]
    assert doc["clusters"][0]["tasks"] == ["t00", "t03", "t06", "t09"]
    assert doc["clusters"][2]["members"] == ["t02", "t05", "t08", "t11"]
    lines = library.export_clustering("mbc-k3", "csv").splitlines()
    assert lines[0] == "cluster,task" and len(lines) == 1 + N
    assert lines[1:5] == ["0,t00", "0,t03", "0,t06", "0,t09"] and lines[-1] == "2,t11"
    with pytest.raises(ValidationError, match="json, csv"):
        library.export_clustering("mbc-k3", "xml")

    with pytest.raises(InUseError, match="--force") as in_use:
        library.remove_clustering("mbc-k3")
    assert (in_use.value.what, in_use.value.name, in_use.value.used_by) == (
        "clustering",
        "mbc-k3",
        ("c1_expert",),
    )
    assert library.clustering("mbc-k3").clusters[1].experts == ("c1_expert",)  # nothing changed
    assert library.remove_clustering("mbc-k3", force=True) == ["c1_expert"]
    assert library.get("c1_expert").cluster is None
    assert library.get("c1_expert").tasks == ("t01", "t04", "t07", "t10")
    with pytest.raises(NotFoundError, match="clusters ls") as missing:
        library.clustering("mbc-k3")
    assert (missing.value.what, missing.value.name) == ("clustering", "mbc-k3")


def test_degenerate_inputs(library: Library, planted: dict[str, Path]) -> None:
    _add_planted(library, planted)
    with pytest.raises(ValidationError, match="k can be at most 12"):
        library.cluster(k=13)
    with pytest.raises(ValidationError, match="k can be at most 12"):
        library.cluster(k_range=[2, 30])
    with pytest.raises(ValidationError, match="unknown metric"):
        library.cluster(k=2, metric="cosine")
    with pytest.raises(ValidationError, match="32-bit"):
        library.cluster(k=2, seed=2**40)
    with pytest.raises(NotFoundError):
        library.cluster("kind=residual", k=2)

    # one expert: one cluster, silhouette undefined
    one = library.cluster(["t00"], name="one")
    assert one.record.k == 1 and one.record.criterion["name"] == "too few experts" and one.silhouette is None
    assert one.record.clusters[0].members == ("t00",) and one.clusters[0].within is None
    assert one.record.query == "name=t00"

    # identical experts: a clustering, with no structure to find
    for i in range(3):
        _add(library, planted["other"], name=f"same{i}", kind="general")
    same = library.cluster("kind=general", k=2, name="same")
    assert sorted(cl.size for cl in same.clusters) == [1, 2]
    pair = next(cl for cl in same.clusters if cl.size == 2)
    assert pair.within == pytest.approx(1.0) and same.silhouette == 0.0
    auto = library.cluster("kind=general", name="same-auto")
    assert auto.record.k == 2 and "no cluster structure" in auto.record.criterion["note"]

    # different ranks: flat refuses with the way out, delta takes them
    _add(library, planted["rank8"], name="t_rank8", tasks=["t_rank8"])
    with pytest.raises(IncompatibleExpertsError, match="--metric delta"):
        library.cluster(k=3)
    mixed = library.cluster(k=4, metric="delta")
    assert any(cl.members == ("t_rank8",) for cl in mixed.record.clusters)


def test_different_base_models_refused(library: Library, planted: dict[str, Path]) -> None:
    _add_planted(library, planted)
    library.add_base("tiny48", str(planted["base48"]))
    _add(library, planted["foreign"], name="foreign", base="tiny48", tasks=["foreign"])
    with pytest.raises(BaseModelMismatchError, match="base="):
        library.cluster("kind=task", k=3)
    c = library.cluster("kind=task base=tiny", k=3)
    assert _same_partition(c) and c.record.query == "kind=task base=tiny"
    # a query that also matches other base models: only the clustering's base counts for staleness
    assert not library.clustering(c.record.name).stale


# --- streaming equals in-memory (SQLite only: no catalog difference) -----------------------------


@pytest.fixture
def sqlite_lib(tmp_path: Path, base_dir: Path, planted: dict[str, Path]) -> Iterator[Library]:
    lib = Library.init(tmp_path / "lib")
    lib.add_base("tiny", str(base_dir))
    _add_planted(lib, planted)
    yield lib
    lib.close()


def test_streamed_similarity_equals_in_memory(sqlite_lib: Library) -> None:
    ctx = sqlite_lib.context
    experts = sqlite_lib.experts("kind=task")
    tensors = [load_expert_tensors(ctx, e, dtype=torch.float32) for e in experts]
    flat = torch.stack([flatten_lora(t) for t in tensors])
    want_flat = cosine_matrix(mbc_features(flat, keep=0.2, dim=64))
    modules = sorted(experts[0].modules)
    want_delta = delta_cosine_matrix(
        [[(t[m][0], t[m][1], e.scale) for m in modules] for t, e in zip(tensors, experts, strict=True)]
    ).double()
    one_module = 1024 * N  # bytes: forces one module per group (4 groups, two passes)
    for budget in (one_module, ops.STREAM_BYTES):
        got, fdim = ops.similarity_matrix(ctx, experts, metric="flat", budget_bytes=budget)
        assert fdim == N
        torch.testing.assert_close(got, want_flat, atol=1e-6, rtol=0)  # float32 block products
        got, fdim = ops.similarity_matrix(ctx, experts, metric="delta", budget_bytes=budget, device="cpu")
        assert fdim is None
        torch.testing.assert_close(got, want_delta, atol=1e-5, rtol=0)
    assert module_groups({m: 256 for m in modules}, N, one_module) == [[m] for m in modules]
