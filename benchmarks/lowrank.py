"""Benchmark of the low-rank core: prototypes and similarity, exact factored math vs dense baselines.

    python benchmarks/lowrank.py            # in = out = 4096, r = 16, 64 experts × 32 modules; 256 experts
    python benchmarks/lowrank.py --quick    # smaller sizes, well under a minute

Prints markdown tables. Dense SVD of a 4096 × 4096 ΔW takes tens of seconds on a small CPU, so it is
timed on a subset of modules and extrapolated (the table says so). "Truth" for prototypes is the
exact method run in float64, itself checked against dense float64 SVD on the timed subset.
Adapters are synthetic with realistic spectra: σ_{i+1}/σ_i = ρ with ρ uniform in [0.73, 0.99] per
module, the range measured on real adapters (see DESIGN.md).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libstore.lowrank.prototypes import exact_prototypes, peft_prototypes
from libstore.lowrank.similarity import delta_cosine_matrix


def _factors(n: int, r: int, n_in: int, n_out: int, seed: int, dtype: torch.dtype = torch.float32):
    """n modules (A (n, r, in), B (n, out, r)) with geometric spectra."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, r, n_in, generator=g) / n_in**0.5
    rho = 0.73 + 0.26 * torch.rand(n, 1, generator=g)
    decay = rho ** torch.arange(r)
    B = torch.randn(n, n_out, r, generator=g) / n_out**0.5 * decay[:, None, :]
    return A.to(dtype), B.to(dtype)


def _timed(fn):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _abs_cos(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    u, v = u.double(), v.double()
    return (u * v).sum(-1).abs() / (u.norm(dim=-1) * v.norm(dim=-1))


def bench_prototypes(n_exp: int, n_mod: int, dim: int, r: int, n_dense: int) -> list[str]:
    n = n_exp * n_mod
    A, B = _factors(n, r, dim, dim, seed=0)
    scale = 2.0
    A4, B4 = A.reshape(n_exp, n_mod, r, dim), B.reshape(n_exp, n_mod, dim, r)

    exact, t_exact = _timed(lambda: exact_prototypes(A4, B4, scale))
    truth, t_truth = _timed(lambda: exact_prototypes(A4.double(), B4.double(), scale))
    peft, t_peft = _timed(lambda: peft_prototypes(A4, B4, scale, seed=0))
    v_exact = exact.vectors.reshape(n, dim)
    v_truth = truth.vectors.reshape(n, dim)
    v_peft = peft.vectors.reshape(n, dim)

    t_dense, cos_dense, cos_check = [], [], []
    for i in range(n_dense):

        def dense(i: int = i) -> torch.Tensor:
            dw = scale * (B[i] @ A[i])
            return torch.linalg.svd(dw, full_matrices=False)[2][0]

        v, t = _timed(dense)
        t_dense.append(t)
        cos_dense.append(float(_abs_cos(v, v_truth[i])))
        if i == 0:  # one float64 dense SVD validates the truth (they are twice as slow again)
            dw64 = scale * (B[i].double() @ A[i].double())
            cos_check.append(float(_abs_cos(torch.linalg.svd(dw64, full_matrices=False)[2][0], v_truth[i])))
    t_dense_all = statistics.mean(t_dense) * n

    c_exact = _abs_cos(v_exact, v_truth)
    c_peft = _abs_cos(v_peft, v_truth)
    rel_values = float(((exact.values - truth.values).abs() / truth.values).max())

    def row(name: str, count: str, secs: float, cmin: float, cmed: float, note: str = "") -> str:
        return (
            f"| {name} | {count} | {secs:.2f} | {1000 * secs / n:.3f} | {t_dense_all / secs:.0f}× "
            f"| {cmin:.7f} | {cmed:.7f} | {note} |"
        )

    lines = [
        f"### Prototypes: {n_exp} experts × {n_mod} modules = {n} modules, in = out = {dim}, r = {r}, fp32",
        "",
        (
            "| method | modules run | time s (all modules) | ms / module | speed-up vs dense "
            "| min abs cos to truth | median abs cos to truth | note |"
        ),
        "|---|---|---|---|---|---|---|---|",
        row(
            "exact, batched (QR + r×r SVD)",
            f"{n}",
            t_exact,
            float(c_exact.min()),
            float(c_exact.median()),
            f"max rel. error of σ₁ {rel_values:.1e}",
        ),
        row(
            "dense SVD of ΔW (torch.linalg.svd)",
            f"{n_dense} (extrapolated ×{n // n_dense})",
            t_dense_all,
            min(cos_dense),
            statistics.median(cos_dense),
            f"measured {statistics.mean(t_dense):.1f} s / module",
        ),
        row(
            "PEFT power iteration, 15 steps (peft method)",
            f"{n}",
            t_peft,
            float(c_peft.min()),
            float(c_peft.median()),
            f"abs cos < 0.999 for {int((c_peft < 0.999).sum())} / {n} modules",
        ),
        row(
            "exact in float64 (the truth)",
            f"{n}",
            t_truth,
            1.0,
            1.0,
            f"vs dense float64 SVD of module 0: 1 − abs cos = {1 - min(cos_check):.1e}",
        ),
        "",
    ]
    return lines


def _experts(n_exp: int, n_mod: int, dim: int, r: int, seed: int, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    experts = []
    for e in range(n_exp):
        A, B = _factors(n_mod, r, dim, dim, seed=seed + e, dtype=dtype)
        experts.append([(A[m], B[m], 2.0) for m in range(n_mod)])
    return experts


def bench_similarity(n_exp: int, small: tuple[int, int, int], full: tuple[int, int, int] | None) -> list[str]:
    n_mod, dim, r = small
    experts = _experts(n_exp, n_mod, dim, r, seed=100, dtype=torch.float32)
    trace, t_trace = _timed(lambda: delta_cosine_matrix(experts))

    def dense() -> torch.Tensor:
        flat = torch.stack([torch.cat([(s * B @ A).reshape(-1) for A, B, s in e]) for e in experts])
        flat = flat / flat.norm(dim=1, keepdim=True)
        return flat @ flat.T

    dense_cos, t_dense = _timed(dense)
    flat64 = torch.stack(
        [torch.cat([(s * B.double() @ A.double()).reshape(-1) for A, B, s in e]) for e in experts]
    )
    norms = flat64.norm(dim=1)
    truth = (flat64 @ flat64.T) / torch.outer(norms, norms)
    del flat64
    d_trace = float((trace.double() - truth).abs().max())
    d_dense = float((dense_cos.double() - truth).abs().max())
    d_both = float((trace - dense_cos).abs().max())

    shape = f"{n_exp} experts × {n_mod} modules × ({dim}×{dim}, r = {r})"
    lines = [
        "### Similarity matrix (cosine of ΔW summed over modules)",
        "",
        "| method | shapes | time s | max abs diff to dense float64 | note |",
        "|---|---|---|---|---|",
        (
            f"| trace formula, `delta_cosine_matrix` (fp32) | {shape} | {t_trace:.2f} | {d_trace:.1e} "
            f"| max abs diff to dense fp32 {d_both:.1e}; {t_dense / t_trace:.0f}× faster |"
        ),
        (
            f"| flattened dense ΔW + cosine (fp32) | {shape} | {t_dense:.2f} | {d_dense:.1e} "
            f"| ΔW flattened: {n_exp} × {n_mod * dim * dim:,} floats |"
        ),
    ]
    if full is not None:
        n_mod, dim, r = full
        experts = _experts(n_exp, n_mod, dim, r, seed=200, dtype=torch.bfloat16)
        big, t_big = _timed(lambda: delta_cosine_matrix(experts))
        dense_gb = n_exp * n_mod * dim * dim * 4 / 2**30
        ok = bool(torch.isfinite(big).all()) and bool(torch.equal(big, big.T))
        lines.append(
            f"| trace formula, `delta_cosine_matrix` (bf16 stored, fp32 math) | {n_exp} experts × "
            f"{n_mod} modules × "
            f"({dim}×{dim}, r = {r}) | {t_big:.2f} | – | dense not run: the flattened ΔW would take "
            f"{dense_gb:,.0f} GiB; "
            f"finite & symmetric: {ok} |"
        )
    lines.append("")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (well under a minute)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.quick:
        proto = {"n_exp": 8, "n_mod": 8, "dim": 1024, "r": 16, "n_dense": 4}
        sim = {"n_exp": 64, "small": (4, 256, 16), "full": (8, 1024, 16)}
    else:
        proto = {"n_exp": 64, "n_mod": 32, "dim": 4096, "r": 16, "n_dense": 2}
        sim = {"n_exp": 256, "small": (4, 512, 16), "full": (32, 4096, 16)}
    print(f"## libstore low-rank benchmark ({'quick' if args.quick else 'full'})")
    print()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, "
        f"CPU fp32"
    )
    print()
    for line in bench_prototypes(**proto):  # type: ignore[arg-type]
        print(line, flush=True)
    for line in bench_similarity(**sim):  # type: ignore[arg-type]
        print(line, flush=True)


if __name__ == "__main__":
    main()
