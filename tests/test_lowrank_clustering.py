"""MBC math: planted clusters are recovered, the exact SVD paths agree, k-means / silhouette match
brute-force references, degenerate inputs behave, and the n = 1000, d = 10⁶ case runs in seconds."""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from libstore.errors import ValidationError
from libstore.lowrank.clustering import (
    cosine_matrix,
    features_from_gram,
    keep_count,
    keep_thresholds,
    mbc,
    mbc_features,
    mbc_similarity,
    sparsified_gram,
)
from libstore.lowrank.partition import (
    ClusterStats,
    KMeansResult,
    choose_k,
    cluster_similarity,
    cluster_stats,
    embed_2d,
    kmeans,
    partition,
    row_embedding,
    silhouette,
    silhouette_samples,
)

# --- helpers


def planted(
    k: int, per: int, noise: float, *, d: int = 5000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """k random centres in R^d, ``per`` experts each = centre + noise·N(0, I), rows shuffled."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    truth = torch.arange(k).repeat_interleave(per)[torch.randperm(k * per, generator=g)]
    return centres[truth] + noise * torch.randn(k * per, d, generator=g), truth


def groups_of(labels: torch.Tensor) -> set[frozenset[int]]:
    """Labels as a set of member sets: equal iff equal up to a relabelling."""
    groups: dict[int, set[int]] = {}
    for i, c in enumerate(labels.tolist()):
        groups.setdefault(c, set()).add(i)
    return {frozenset(v) for v in groups.values()}


def dense_cosine(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = x / x.norm(dim=1, keepdim=True)
    return x @ x.T


def reference_features(flat: torch.Tensor, keep: float, dim: int) -> torch.Tensor:
    """Written independently: topk per row, dense float64 SVD, U·Σ, normalise (signs left arbitrary)."""
    x = flat.double()
    m = max(1, math.ceil(keep * x.shape[1] - 1e-9))
    idx = x.abs().topk(m, dim=1).indices
    xs = torch.zeros_like(x).scatter_(1, idx, x.gather(1, idx))
    u, s, _ = torch.linalg.svd(xs, full_matrices=False)
    r = min(dim, *x.shape)
    f = u[:, :r] * s[:r]
    return f / f.norm(dim=1, keepdim=True)


def align_signs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """b with each column's sign flipped to best match a."""
    return b * torch.sign((a * b).sum(0) + 1e-300)


# --- recovery


@pytest.mark.parametrize("k", [2, 4, 10])
@pytest.mark.parametrize("noise", [0.5, 1.0, 2.0])
def test_planted_clusters_recovered_through_flat_path(k: int, noise: float) -> None:
    flat, truth = planted(k, per=8, noise=noise, seed=k * 10 + int(noise * 10))
    features = mbc_features(flat)
    assert features.shape == (k * 8, min(64, k * 8))
    S = cosine_matrix(features)
    result = cluster_similarity(S, k, seed=0)
    assert groups_of(result.labels) == groups_of(truth)
    assert mbc(flat, k).clustering.labels.tolist() == result.labels.tolist()


@pytest.mark.parametrize("k", [2, 4, 10])
@pytest.mark.parametrize("noise", [0.5, 2.0])
def test_planted_clusters_recovered_from_cosine_matrix(k: int, noise: float) -> None:
    flat, truth = planted(k, per=6, noise=noise, seed=100 + k)
    result = cluster_similarity(dense_cosine(flat), k, seed=3)
    assert groups_of(result.labels) == groups_of(truth)


@pytest.mark.parametrize("k", [2, 4, 10])
def test_choose_k_finds_planted_k(k: int) -> None:
    flat, _ = planted(k, per=6, noise=1.0, seed=200 + k)
    S = cosine_matrix(mbc_features(flat))
    ks = range(1, min(14, S.shape[0] + 1))
    best, scores = choose_k(S, ks, seed=0)
    assert best == k
    assert scores[1] is None
    assert set(scores) == set(ks)
    assert max(v for v in scores.values() if v is not None) == scores[k]


def test_deterministic_and_seed_independent_on_separated_data() -> None:
    flat, truth = planted(5, per=7, noise=0.7, seed=7)
    S = cosine_matrix(mbc_features(flat))
    a, b = cluster_similarity(S, 5, seed=11), cluster_similarity(S, 5, seed=11)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.centers, b.centers) and a.inertia == b.inertia
    for seed in (0, 1, 2, 12345):
        assert groups_of(cluster_similarity(S, 5, seed=seed).labels) == groups_of(truth)
    # the random source is local: global RNG state neither influences nor is touched by k-means
    torch.manual_seed(999)
    before = torch.random.get_rng_state()
    assert torch.equal(cluster_similarity(S, 5, seed=11).labels, a.labels)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_labels_are_canonical() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 3, generator=g)
    for seed in range(4):
        labels = kmeans(x, 6, seed=seed).labels
        assert labels.dtype == torch.int64 and labels[0] == 0
        first = [labels.tolist().index(c) for c in range(6)]
        assert first == sorted(first)


# --- exact SVD


@pytest.mark.parametrize("shape", [(30, 400), (12, 50), (7, 3000)])
def test_gram_path_equals_direct_svd_and_reference(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[1])
    # distinct singular values so the components are unique up to sign
    flat = torch.randn(*shape, generator=g, dtype=torch.float64) * torch.linspace(
        1, 3, shape[1], dtype=torch.float64
    )
    for dim in (64, 5):
        gram = mbc_features(flat, keep=0.3, dim=dim, method="gram")
        svd = mbc_features(flat, keep=0.3, dim=dim, method="svd")
        assert gram.shape == svd.shape == (shape[0], min(dim, *shape))
        torch.testing.assert_close(gram, svd, atol=1e-9, rtol=0)
        ref = reference_features(flat, 0.3, dim)
        torch.testing.assert_close(align_signs(ref, gram), ref, atol=1e-9, rtol=0)
    f32 = mbc_features(flat.float(), keep=0.3, method="gram")
    torch.testing.assert_close(f32, mbc_features(flat, keep=0.3, method="gram"), atol=1e-4, rtol=0)


def test_matches_mttl_pipeline_emulation() -> None:
    """mttl's SVDEmbeddingTransform in numpy (np.quantile per row, zero |x| <= q, TruncatedSVD's U·Σ,
    normalise, cosine) — exact SVD in place of its randomized one — gives the same similarity matrix."""
    flat, _ = planted(6, per=14, noise=1.5, d=3000, seed=21)  # n = 84 > 64: the truncation matters
    a = flat.double().numpy().copy()
    a[np.abs(a) <= np.quantile(np.abs(a), 0.8, axis=1)[:, None]] = 0.0
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    emb = u[:, :64] * s[:64]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    S = cosine_matrix(mbc_features(flat, keep=0.2, dim=64))
    torch.testing.assert_close(S, torch.from_numpy(emb @ emb.T), atol=1e-5, rtol=0)


def test_chunked_gram_equals_dense_and_low_precision_inputs_work() -> None:
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(9, 1001, generator=g)
    thr = keep_thresholds(flat, 0.2)
    xs = torch.where(flat.abs() >= thr[:, None].float(), flat, 0).double()
    dense = xs @ xs.T
    for block in (1, 7, 100, 1001, 5000):
        torch.testing.assert_close(sparsified_gram(flat, thr, block_cols=block), dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features_from_gram(dense), mbc_features(flat, keep=0.2), atol=1e-5, rtol=0)
    for dtype in (torch.bfloat16, torch.float16):
        f = mbc_features(flat.to(dtype))
        assert f.dtype == torch.float64 and torch.isfinite(f).all()
        torch.testing.assert_close(f.norm(dim=1), torch.ones(9, dtype=torch.float64))


def test_keep_is_per_row_and_matches_mttl_quantile_rule() -> None:
    g = torch.Generator().manual_seed(4)
    # rows of very different scale: a global threshold would keep almost everything of the big row
    flat = torch.randn(5, 997, generator=g) * torch.tensor([[1e-3], [1.0], [10.0], [1e3], [0.5]])
    for keep in (0.2, 0.5, 0.01, 1.0):
        m = keep_count(997, keep)
        kept = flat.abs() >= keep_thresholds(flat, keep)[:, None].float()
        assert kept.sum(1).tolist() == [m] * 5
        a = np.abs(flat.numpy())
        mttl = ~(a <= np.quantile(a, 1 - keep, axis=1)[:, None])  # mttl: array[|x| <= thr] = 0
        assert (kept.numpy() ^ mttl).sum(1).max() <= 1
    assert keep_count(10, 0.3) == 3 and keep_count(10, 0.01) == 1 and keep_count(10, 1.0) == 10


def test_inputs_are_not_mutated() -> None:
    g = torch.Generator().manual_seed(8)
    flat = torch.randn(6, 300, generator=g, dtype=torch.float64)
    copy = flat.clone()
    S = cosine_matrix(mbc_features(flat, method="gram"))
    mbc_features(flat, method="svd")
    S_copy = S.clone()
    labels = cluster_similarity(S, 2).labels
    silhouette(S, labels, metric="distance")
    silhouette(S, labels)
    cluster_stats(S, labels)
    embed_2d(S)
    assert torch.equal(flat, copy) and torch.equal(S, S_copy)


# --- k-means


def brute_force_inertia(x: torch.Tensor, k: int) -> tuple[float, set[frozenset[int]]]:
    best, best_labels = math.inf, None
    for assign in itertools.product(range(k), repeat=x.shape[0]):
        if len(set(assign)) < k:
            continue
        lab = torch.tensor(assign)
        inertia = sum(float(((x[lab == c] - x[lab == c].mean(0)) ** 2).sum()) for c in range(k))
        if inertia < best - 1e-12:
            best, best_labels = inertia, lab
    assert best_labels is not None
    return best, groups_of(best_labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_reaches_brute_force_optimum(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 2, generator=g, dtype=torch.float64)
    opt, opt_partition = brute_force_inertia(x, 3)
    result = kmeans(x, 3, seed=seed)
    assert result.inertia == pytest.approx(opt, rel=1e-12)
    assert groups_of(result.labels) == opt_partition
    for c in range(3):
        torch.testing.assert_close(result.centers[c], x[result.labels == c].mean(0))


def test_kmeans_handles_duplicates_and_empty_clusters() -> None:
    x = torch.tensor([[0.0, 0.0]] * 4 + [[10.0, 10.0]] * 2)
    result = kmeans(x, 4, seed=0)
    assert torch.bincount(result.labels, minlength=4).min() >= 1
    assert torch.isfinite(result.centers).all() and result.inertia == 0.0
    assert kmeans(x, 6).inertia == 0.0  # k = n: every row alone
    # k > number of distinct rows, identical rows throughout: zero D², still k non-empty clusters
    same = torch.ones(5, 3)
    r = kmeans(same, 3, seed=2)
    assert sorted(torch.bincount(r.labels).tolist()) == [1, 1, 3] and r.inertia == 0.0


# --- silhouette, stats, embedding


def silhouette_loops(D: list[list[float]], labels: list[int]) -> float:
    """The textbook definition, one sample at a time (singleton: 0)."""
    n, scores = len(labels), []
    for i in range(n):
        own = [j for j in range(n) if labels[j] == labels[i] and j != i]
        if not own:
            scores.append(0.0)
            continue
        a = sum(D[i][j] for j in own) / len(own)
        b = min(
            sum(D[i][j] for j in range(n) if labels[j] == c) / sum(1 for j in range(n) if labels[j] == c)
            for c in set(labels) - {labels[i]}
        )
        scores.append(0.0 if max(a, b) == 0 else (b - a) / max(a, b))
    return sum(scores) / n


def test_silhouette_matches_dense_loops() -> None:
    g = torch.Generator().manual_seed(9)
    S = dense_cosine(torch.randn(13, 6, generator=g, dtype=torch.float64))
    labels = torch.tensor([5, 5, 2, 2, 2, 7, 5, 9, 2, 7, 7, 5, 2])  # 9 is a singleton; labels not 0..k-1
    D = (1 - S).tolist()
    assert silhouette(S, labels) == pytest.approx(silhouette_loops(D, labels.tolist()), abs=1e-12)
    pts = torch.rand(13, 2, generator=g, dtype=torch.float64)
    dist = torch.cdist(pts, pts)
    assert silhouette(dist, labels, metric="distance") == pytest.approx(
        silhouette_loops(dist.tolist(), labels.tolist()), abs=1e-12
    )
    samples = silhouette_samples(S, labels)
    assert samples is not None and samples[7] == 0.0 and samples.shape == (13,)
    assert silhouette(S, torch.zeros(13, dtype=torch.long)) is None  # one cluster
    assert silhouette(S, torch.arange(13)) is None  # every expert alone
    with pytest.raises(ValidationError, match="metric"):
        silhouette(S, labels, metric="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="labels"):
        silhouette(S, labels[:5])


def test_cluster_stats_match_loops() -> None:
    g = torch.Generator().manual_seed(10)
    S = dense_cosine(torch.randn(9, 4, generator=g, dtype=torch.float64))
    labels = torch.tensor([3, 1, 1, 3, 8, 1, 3, 3, 1])
    stats = cluster_stats(S, labels)
    assert [s.label for s in stats] == [1, 3, 8] and all(isinstance(s, ClusterStats) for s in stats)
    for s in stats:
        inside = [i for i in range(9) if labels[i] == s.label]
        outside = [i for i in range(9) if labels[i] != s.label]
        assert s.members == tuple(inside) and s.size == len(inside)
        pairs = [float(S[i, j]) for i in inside for j in inside if i != j]
        assert s.within == (pytest.approx(sum(pairs) / len(pairs)) if pairs else None)
        cross = [float(S[i, j]) for i in inside for j in outside]
        assert s.between == pytest.approx(sum(cross) / len(cross))
    assert cluster_stats(S, torch.zeros(9, dtype=torch.long))[0].between is None


def test_embed_2d_recovers_planar_geometry_with_fixed_signs() -> None:
    g = torch.Generator().manual_seed(12)
    angles = torch.rand(15, generator=g, dtype=torch.float64) * math.pi  # half circle: not centred
    pts = torch.stack([angles.cos(), angles.sin()], 1)
    S = pts @ pts.T
    e = embed_2d(S)
    assert e.shape == (15, 2)
    torch.testing.assert_close(torch.cdist(e, e), torch.cdist(pts, pts), atol=1e-9, rtol=0)
    assert torch.equal(embed_2d(S), e)
    for c in range(2):
        assert e[e[:, c].abs().argmax(), c] > 0
    sym = embed_2d(torch.ones(4, 4))
    assert torch.equal(sym, torch.zeros(4, 2))


# --- degenerate input


def test_k_out_of_range() -> None:
    S = torch.eye(3)
    with pytest.raises(ValidationError, match="at most 3"):
        cluster_similarity(S, 4)
    with pytest.raises(ValidationError, match="at most 3"):
        choose_k(S, range(2, 6))
    for bad in (0, -1):
        with pytest.raises(ValidationError, match="k must be at least 1"):
            kmeans(S, bad)
    with pytest.raises(ValidationError, match="integer"):
        kmeans(S, 2.5)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="empty"):
        choose_k(S, [])


def test_one_expert() -> None:
    flat = torch.randn(1, 100, generator=torch.Generator().manual_seed(0))
    f = mbc_features(flat)
    assert f.shape == (1, 1) and f.abs().item() == pytest.approx(1.0)
    S = cosine_matrix(f)
    assert S.tolist() == [[1.0]]
    r = cluster_similarity(S, 1)
    assert isinstance(r, KMeansResult) and r.labels.tolist() == [0] and r.inertia == 0.0
    assert silhouette(S, r.labels) is None
    assert choose_k(S, [1]) == (1, {1: None})
    assert cluster_stats(S, r.labels) == [ClusterStats(0, 1, (0,), None, None)]
    assert embed_2d(S).tolist() == [[0.0, 0.0]]
    with pytest.raises(ValidationError, match="at most 1"):
        mbc(flat, 2)


def test_identical_experts() -> None:
    row = torch.randn(1, 2000, generator=torch.Generator().manual_seed(1))
    flat = row.repeat(6, 1)
    for method in ("gram", "svd"):
        f = mbc_features(flat, method=method)  # type: ignore[arg-type]
        assert torch.isfinite(f).all()
        S = cosine_matrix(f)
        torch.testing.assert_close(S, torch.ones(6, 6, dtype=torch.float64))
    r = cluster_similarity(S, 3, seed=4)
    assert torch.bincount(r.labels).min() >= 1 and torch.isfinite(r.centers).all()
    assert r.inertia == pytest.approx(0.0, abs=1e-20)
    assert silhouette(S, r.labels) == 0.0
    best, scores = choose_k(S, range(1, 7))
    assert best == 2 and scores[2] == 0.0 and scores[6] is None
    assert all(s.within == pytest.approx(1.0) for s in cluster_stats(S, r.labels) if s.size > 1)
    assert torch.isfinite(embed_2d(S)).all()


def test_zero_expert_stays_finite() -> None:
    flat = torch.randn(4, 500, generator=torch.Generator().manual_seed(2))
    flat[2] = 0
    S = cosine_matrix(mbc_features(flat))
    assert torch.isfinite(S).all() and S[2, 2] == 1.0 and S[2, 0] == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_input_refused(bad: float) -> None:
    flat = torch.randn(4, 50, generator=torch.Generator().manual_seed(3))
    flat[1, 7] = bad
    with pytest.raises(ValidationError, match="row 1"):
        mbc_features(flat)
    with pytest.raises(ValidationError, match="NaN"):
        mbc_features(flat, keep=1.0, method="svd")
    S = torch.eye(4)
    S[0, 1] = bad
    for call in (
        lambda: cosine_matrix(flat),
        lambda: kmeans(flat, 2),
        lambda: cluster_similarity(S, 2),
        lambda: silhouette(S, torch.tensor([0, 0, 1, 1])),
        lambda: cluster_stats(S, torch.tensor([0, 0, 1, 1])),
        lambda: embed_2d(S),
        lambda: choose_k(S, [2]),
    ):
        with pytest.raises(ValidationError, match="NaN"):
            call()


def test_bad_shapes_and_options() -> None:
    x = torch.randn(4, 10)
    with pytest.raises(ValidationError, match="keep"):
        mbc_features(x, keep=0.0)
    with pytest.raises(ValidationError, match="keep"):
        mbc_features(x, keep=1.5)
    with pytest.raises(ValidationError, match="dim"):
        mbc_features(x, dim=0)
    with pytest.raises(ValidationError, match="method"):
        mbc_features(x, method="eig")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="2-D"):
        mbc_features(torch.randn(10))
    with pytest.raises(ValidationError, match="floating"):
        mbc_features(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValidationError, match="square"):
        cluster_similarity(x, 2)
    with pytest.raises(ValidationError, match="n_init"):
        kmeans(x, 2, n_init=0)


# --- scale


@pytest.mark.slow
def test_scale_1000_experts_1m_params(capsys: pytest.CaptureFixture[str]) -> None:
    n, d, k = 1000, 1_000_000, 10
    wall: dict[str, float] = {}
    cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        t, c = time.perf_counter(), time.process_time()
        yield
        wall[name], cpu[name] = time.perf_counter() - t, time.process_time() - c

    with stage("generate"):
        g = torch.Generator().manual_seed(0)
        truth = torch.arange(n) % k
        # low rank (k centres + 64 shared noise directions) keeps data creation to a few seconds
        basis = torch.randn(k + 64, d, generator=g)
        noise = 0.1 * torch.randn(n, 64, generator=g)
        flat = torch.cat([torch.nn.functional.one_hot(truth, k).float(), noise], 1) @ basis
        del basis
    with stage("thresholds"):
        thr = keep_thresholds(flat, 0.2)
    with stage("gram"):
        gram = sparsified_gram(flat, thr)
    with stage("eigh"):
        features = features_from_gram(gram, 64)
    with stage("cosine"):
        S = cosine_matrix(features)
    with stage("kmeans"):
        result = cluster_similarity(S, k, seed=0)
    with stage("silhouette+stats"):
        score = silhouette(S, result.labels)
        stats = cluster_stats(S, result.labels)

    assert features.shape == (n, 64)
    assert groups_of(result.labels) == groups_of(truth)
    assert score is not None and score > 0.5 and len(stats) == k
    mbc_wall = sum(v for key, v in wall.items() if key != "generate")
    with capsys.disabled():
        split = ", ".join(f"{key} {wall[key]:.2f}s (cpu {cpu[key]:.2f}s)" for key in wall)
        print(f"\nMBC n={n} d={d}: {split}; MBC total {mbc_wall:.2f}s wall")
    # ~10 s wall on an idle 2-core CPU; bound the CPU time, which a busy machine inflates far less than wall
    assert sum(v for key, v in cpu.items() if key != "generate") < 120


# --- the streamed production path and partition (what ``libstore cluster`` runs)


@pytest.mark.parametrize("first_width", [7, 300, 1000])
@pytest.mark.parametrize("block", [1, 64, 1000])
def test_streamed_mbc_similarity_equals_in_memory_reference(first_width: int, block: int) -> None:
    """Rows once, then column blocks of any width: the same similarity as the independent
    in-memory reference (top-k by magnitude, dense float64 SVD, cosine)."""
    flat, _ = planted(4, 5, 1.0, d=1000, seed=3)
    want = dense_cosine(reference_features(flat, 0.2, 8))
    rest = flat[:, first_width:]
    blocks = [rest[:, j : j + block] for j in range(0, rest.shape[1], block)]
    S, fdim = mbc_similarity(
        iter(flat), iter(blocks), n=20, first_width=first_width, keep=0.2, dim=8, block_cols=33
    )
    assert fdim == 8 and S.dtype == torch.float64
    torch.testing.assert_close(S, want, atol=1e-6, rtol=0)  # float32 block products
    torch.testing.assert_close(S, cosine_matrix(mbc_features(flat, keep=0.2, dim=8)), atol=2e-6, rtol=0)
    S64, _ = mbc_similarity(
        iter(flat.double()), iter(b.double() for b in blocks), n=20, first_width=first_width, dim=8
    )
    torch.testing.assert_close(S64, want, atol=1e-12, rtol=0)
    with pytest.raises(ValidationError, match="no experts"):
        mbc_similarity(iter(()), iter(()), n=1, first_width=1)
    with pytest.raises(ValidationError, match="19 rows given for n=20"):
        mbc_similarity(iter(flat[:19]), iter(()), n=20, first_width=1000)


def test_partition_criteria() -> None:
    S = torch.eye(2, dtype=torch.float64)
    p = partition(S)
    assert p.k == 1 and p.criterion["name"] == "too few experts" and p.silhouette is None
    block = torch.block_diag(torch.ones(3, 3), torch.ones(2, 2)).double()
    p = partition(block, seed=3)
    assert p.k == 2 and p.labels == (0, 0, 0, 1, 1) and p.silhouette == pytest.approx(1.0)
    assert p.stats[0] == {"within": 1.0, "between": 0.0, "silhouette": 1.0}
    with pytest.raises(ValidationError, match="at most 5"):
        partition(block, k=6)


def test_partition_on_row_embedding_equals_kmeans_on_rows_of_S() -> None:
    """k-means runs on an isometric embedding of S's rows: same choices as mttl's k-means on S."""
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(5, (120,), generator=g)
    feats = torch.randn(5, 16, generator=g, dtype=torch.float64)[truth]
    feats = feats + 1.2 * torch.randn(120, 16, generator=g, dtype=torch.float64)
    S = torch.round(cosine_matrix(feats), decimals=12)
    Y = row_embedding(S)
    assert Y.shape == (120, 16)  # rank of S: 64 columns instead of n in the paper's setting
    torch.testing.assert_close(torch.cdist(Y, Y), torch.cdist(S, S), atol=1e-6, rtol=0)
    for k, seed in ((2, 0), (5, 1), (9, 2)):
        p = partition(S, k=k, seed=seed)
        km = cluster_similarity(S, k, seed=seed)
        assert p.labels == tuple(km.labels.tolist()), (k, seed)
    assert torch.equal(row_embedding(torch.zeros(3, 3)), torch.zeros(3, 1, dtype=torch.float64))
