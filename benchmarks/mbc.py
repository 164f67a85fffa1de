"""Benchmark of MBC clustering: 1,000 experts, from in-memory tensors and through the catalog.

    python benchmarks/mbc.py                 # n = 1000, rank 8, 32 modules of 256 × 256, k = 10
    python benchmarks/mbc.py --quick         # n = 200, well under a minute
    python benchmarks/mbc.py --metrics flat  # skip the (much more expensive) exact ΔW metric
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python benchmarks/mbc.py   # on a shared, busy machine

On a machine whose cores other jobs also use, multi-threaded torch/BLAS waits at every parallel region
for a descheduled thread; one thread per process gives far steadier (and there, faster) numbers.

Experts are planted around ``--k`` random centres (centre + ``--noise`` × centre-scale Gaussian), so
every row also says whether the planted clusters were recovered exactly. The catalog path imports the
experts into a fresh library (PEFT folders written with the keys and config PEFT writes) and clusters
them with the library's streaming loader, in a child process so its peak memory is its own; the table
compares that peak with the size of all the experts' tensors.

Prints markdown tables: where the time goes (loading + features + similarity vs k-means), per path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODULE_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _rss_mb() -> float:
    """Peak resident memory of this process in MiB. VmHWM (Linux) rather than ru_maxrss, which a
    child started by fork + exec inherits from its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _planted(n: int, k: int, layers: int, dim: int, r: int, noise: float, seed: int = 0):  # type: ignore[no-untyped-def]
    """A (n, M, r, dim), B (n, M, dim, r) float32 around k centres; truth labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    m = layers * len(MODULE_KINDS)
    truth = torch.randint(k, (n,), generator=g)
    cA = torch.randn(k, m, r, dim, generator=g) / dim**0.5
    cB = torch.randn(k, m, dim, r, generator=g) / r**0.5
    A = cA[truth] + noise * torch.randn(n, m, r, dim, generator=g) / dim**0.5
    B = cB[truth] + noise * torch.randn(n, m, dim, r, generator=g) / r**0.5
    return A, B, truth


def module_names(layers: int) -> list[str]:
    return sorted(f"model.layers.{i}.self_attn.{kind}" for i in range(layers) for kind in MODULE_KINDS)


def _recovered(labels: list[int] | torch.Tensor, truth: torch.Tensor) -> bool:
    """Exactly the planted partition (up to numbering)."""
    pairs = set(zip(torch.as_tensor(labels).tolist(), truth.tolist(), strict=True))
    return len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


class Span(float):
    """Wall seconds, carrying the process CPU seconds (all threads) spent in the same span."""

    cpu: float

    def __new__(cls, wall: float, cpu: float) -> Span:
        obj = super().__new__(cls, wall)
        obj.cpu = cpu
        return obj

    def show(self) -> str:
        return f"{float(self):.2f} ({self.cpu:.2f})"


def _timed(fn):  # type: ignore[no-untyped-def]
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, Span(time.perf_counter() - t, time.process_time() - c)


# --- in memory ----------------------------------------------------------------------------------


def bench_memory(
    A: torch.Tensor, B: torch.Tensor, truth: torch.Tensor, k: int, metrics: list[str], scale: float
) -> list[dict]:
    from libstore.lowrank.clustering import cosine_matrix, mbc_features
    from libstore.lowrank.partition import cluster_similarity, partition
    from libstore.lowrank.similarity import delta_cosine_matrix

    n, m = A.shape[0], A.shape[1]
    rows = []
    if "flat" in metrics:
        # flatten_lora's order: modules sorted by name (A is already in that order), A then B per module
        flat = torch.cat([A.reshape(n, m, -1), B.reshape(n, m, -1)], dim=2).reshape(n, -1)
        S, t_sim = _timed(lambda: cosine_matrix(mbc_features(flat, keep=0.2, dim=64)))
        del flat
        km, t_km = _timed(lambda: cluster_similarity(S, k, seed=0))
        rows.append(
            {
                "path": "in memory, k-means on rows of S (mttl's way)",
                "metric": "flat",
                "k": f"{k} (given)",
                "sim": t_sim,
                "cluster": t_km,
                "ok": _recovered(km.labels, truth),
            }
        )
        part, t_part = _timed(lambda: partition(S, k=k, seed=0))
        assert list(part.labels) == km.labels.tolist()  # the row embedding makes the same choices
        rows.append(
            {
                "path": "in memory",
                "metric": "flat",
                "k": f"{k} (given)",
                "sim": t_sim,
                "cluster": t_part,
                "ok": _recovered(list(part.labels), truth),
            }
        )
        part, t_auto = _timed(lambda: partition(S, seed=0))
        rows.append(
            {
                "path": "in memory",
                "metric": "flat",
                "k": f"auto 2..20 → {part.k}",
                "sim": t_sim,
                "cluster": t_auto,
                "ok": _recovered(list(part.labels), truth),
            }
        )
    if "delta" in metrics:
        per_expert = [[(A[i, j], B[i, j], scale) for j in range(m)] for i in range(n)]
        S, t_sim = _timed(lambda: delta_cosine_matrix(per_expert).double())
        part, t_part = _timed(lambda: partition(S, k=k, seed=0))
        rows.append(
            {
                "path": "in memory",
                "metric": "delta",
                "k": f"{k} (given)",
                "sim": t_sim,
                "cluster": t_part,
                "ok": _recovered(list(part.labels), truth),
            }
        )
    return rows


# --- through the catalog ------------------------------------------------------------------------


def write_library(root: Path, A: torch.Tensor, B: torch.Tensor, layers: int, dim: int, r: int) -> dict:
    """A base model config, n PEFT folders, and a library holding them (timed import)."""
    from safetensors.torch import save_file

    from libstore import Library
    from tests.factories import make_adapter, make_base_model

    base = make_base_model(
        root / "base",
        hidden_size=dim,
        intermediate_size=dim,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    template = make_adapter(base, root / "template", r=r, alpha=2 * r, targets=MODULE_KINDS)
    config = (template / "adapter_config.json").read_bytes()
    names = module_names(layers)
    n = A.shape[0]
    t = time.perf_counter()
    for i in range(n):
        folder = root / "src" / f"task{i:04d}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_bytes(config)
        tensors = {}
        for j, mod in enumerate(names):
            tensors[f"base_model.model.{mod}.lora_A.weight"] = A[i, j].contiguous()
            tensors[f"base_model.model.{mod}.lora_B.weight"] = B[i, j].contiguous()
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    t_write = time.perf_counter() - t
    lib = Library.init(root / "lib")
    lib.add_base("bench", str(base))
    report, t_import = _timed(lambda: lib.import_dir(root / "src", task_from_name=True))
    assert len(report.added) == n
    lib.close()
    return {"write": t_write, "import": t_import}


def catalog_child(lib_path: str, k: int, metric: str, budget_mib: int) -> None:
    """Run in a child process: cluster through the catalog, print timings and peak RSS as JSON."""
    from libstore import Library
    from libstore.lowrank.partition import partition
    from libstore.ops import clusters as ops

    def span(x: Span) -> list[float]:
        return [float(x), x.cpu]

    ops.STREAM_BYTES = budget_mib << 20
    lib = Library.open(lib_path)
    experts = lib.experts("kind=task")
    with torch.no_grad():  # warm-up (lazy imports, BLAS/LAPACK start-up) on 3 experts
        partition(ops.similarity_matrix(lib.context, experts[:3], metric=metric, device="cpu")[0], k=2)
    rss0 = _rss_mb()
    out: dict = {"rss0": rss0, "rows": []}
    with torch.no_grad():
        (S, _), t_sim = _timed(
            lambda: ops.similarity_matrix(lib.context, experts, metric=metric, device="cpu")
        )
    part, t_part = _timed(lambda: partition(S, k=k, seed=0))
    out["rss_sim"] = _rss_mb()
    rec, t_total = _timed(
        lambda: lib.cluster(k=k, metric=metric, device="cpu", name=f"bench-{metric}-{budget_mib}")
    )
    assert [cl.members for cl in rec.record.clusters] == [
        tuple(experts[i].name for i, lab in enumerate(part.labels) if lab == c) for c in range(part.k)
    ]
    out["rows"].append(
        {
            "metric": metric,
            "k": f"{k} (given)",
            "sim": span(t_sim),
            "cluster": span(t_part),
            "total": span(t_total),
            "labels": list(part.labels),
        }
    )
    if metric == "flat":
        part_auto, t_pauto = _timed(lambda: partition(S, seed=0))
        auto, t_auto = _timed(lambda: lib.cluster(name=f"auto-{budget_mib}", metric="flat"))
        assert auto.record.k == part_auto.k
        out["rows"].append(
            {
                "metric": "flat",
                "k": f"auto 2..20 → {auto.record.k}",
                "sim": span(t_sim),
                "cluster": span(t_pauto),
                "total": span(t_auto),
                "labels": list(part_auto.labels),
            }
        )
    out["rss_peak"] = _rss_mb()
    lib.close()
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--layers", type=int, default=8, help="4 modules (q, k, v, o) per layer")
    ap.add_argument("--dim", type=int, default=256, help="in = out features of every module")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--metrics", default="flat,delta")
    ap.add_argument("--quick", action="store_true", help="n = 200")
    ap.add_argument("--skip-catalog", action="store_true")
    ap.add_argument(
        "--budgets",
        default="256,64",
        help="streaming budgets (MiB) to run the catalog path with; the first for every "
        "metric, the others for flat only",
    )
    ap.add_argument("--catalog-child", help=argparse.SUPPRESS)
    ap.add_argument("--child-metric", help=argparse.SUPPRESS)
    ap.add_argument("--child-budget", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    metrics = [m for m in args.metrics.split(",") if m]
    if args.catalog_child:
        catalog_child(args.catalog_child, args.k, args.child_metric, args.child_budget)
        return
    n = 200 if args.quick else args.n
    m = args.layers * len(MODULE_KINDS)
    d = m * args.rank * 2 * args.dim
    scale = 2.0  # alpha = 2r
    print(
        f"# MBC benchmark: {n} experts, rank {args.rank}, {m} modules ({args.layers} layers × "
        f"{'/'.join(MODULE_KINDS)}), every module in = out = {args.dim}"
    )
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads, OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}); {d:,} parameters per expert, "
        f"{n * d * 4 / 2**20:.0f} MiB of float32 tensors in all; planted k = {args.k}, "
        f"noise {args.noise}\n"
    )

    A, B, truth = _planted(n, args.k, args.layers, args.dim, args.rank, args.noise)
    warm = torch.randn(8, 4096, dtype=torch.float64)  # warm-up: BLAS/LAPACK start-up, lazy imports
    from libstore.lowrank.clustering import cosine_matrix, mbc_features
    from libstore.lowrank.partition import partition

    partition(cosine_matrix(mbc_features(warm.float())), k=2)
    rows = bench_memory(A, B, truth, args.k, metrics, scale)
    extra: dict = {}
    if not args.skip_catalog:
        budgets = [int(b) for b in args.budgets.split(",") if b]
        runs = [(m, budgets[0]) for m in metrics] + [("flat", b) for b in budgets[1:] if "flat" in metrics]
        root = Path(tempfile.mkdtemp(prefix="libstore-mbc-bench-"))
        try:
            extra = write_library(root, A, B, args.layers, args.dim, args.rank)
            del A, B
            extra["memory"] = []
            for metric, budget in runs:
                child = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--catalog-child",
                        str(root / "lib"),
                        "--k",
                        str(args.k),
                        "--child-metric",
                        metric,
                        "--child-budget",
                        str(budget),
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if child.returncode != 0:
                    sys.exit(f"catalog child ({metric}, {budget} MiB) failed:\n{child.stderr[-4000:]}")
                res = json.loads(child.stdout.strip().splitlines()[-1])
                # the library sorts experts by name (task0000, ...): the order they were generated in
                for r in res["rows"]:
                    rows.append(
                        {
                            "path": f"catalog, {budget} MiB budget",
                            "metric": r["metric"],
                            "k": r["k"],
                            "sim": Span(*r["sim"]),
                            "cluster": Span(*r["cluster"]),
                            "total": Span(*r["total"]),
                            "ok": _recovered(r["labels"], truth),
                        }
                    )
                extra["memory"].append(
                    (metric, budget, res["rss_sim"] - res["rss0"], res["rss_peak"] - res["rss0"])
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)

    print("Seconds as wall (CPU of all threads): on a shared machine wall time includes waiting for cores.\n")
    print(
        "| path | metric | k | load + features + similarity s | k-means (+ choice of k) s "
        "| lib.cluster end to end s | planted clusters recovered |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        total = r["total"].show() if "total" in r else "–"
        print(
            f"| {r['path']} | {r['metric']} | {r['k']} | {r['sim'].show()} | {r['cluster'].show()} | "
            f"{total} | {'yes' if r['ok'] else 'NO'} |"
        )
    if extra:
        print(
            f"\nCatalog: writing {n} PEFT folders {float(extra['write']):.1f} s; `import_dir` of {n} experts "
            f"(validate, hash, store blobs, one transaction) {extra['import'].show()} s "
            f"({float(extra['import']) / n * 1000:.1f} ms per expert)."
        )
        print(
            f"\nPeak memory of the catalog path (child process, over its resident size after opening "
            f"the library; all {n} experts' tensors are {n * d * 4 / 2**20:.0f} MiB):\n"
        )
        print(
            "| metric | streaming budget MiB | peak growth, similarity only MiB | peak growth, whole "
            "run MiB |"
        )
        print("|---|---|---|---|")
        for metric, budget, sim_mb, peak_mb in extra["memory"]:
            print(f"| {metric} | {budget} | {sim_mb:.0f} | {peak_mb:.0f} |")


if __name__ == "__main__":
    main()
