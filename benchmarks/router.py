"""Router benchmark: libstore's Arrow router against PEFT 0.21's ``create_arrow_model``, and
libstore's routers against each other.

    python benchmarks/router.py [--quick] [--experts 8,32,128,256] [--peft-max 128] [--repeats 5]
    python benchmarks/router.py --routers arrow,spectr,uniform,arrow/seq,spectr/seq --experts 8,32,128

With ``--routers`` it compares the routers instead (same model, experts and process-per-configuration
rule): build s from tensors in memory (router keys computed from the factors: Arrow's top singular
vector, SpectR's whole spectrum), steady forward of a 2 x 256 batch, decoding tokens/s (a 2 x 16
prompt, 32 new tokens, greedy, KV cache), and each number as a ratio to Arrow's at the same E.
``NAME/seq`` routes each sequence once from its prompt (``granularity="sequence"``).

The DESIGN.md reference setting: a Llama-style model (hidden 512, 4 layers, intermediate 1376, vocab
1000), rank-8 experts on all 7 Linear modules of every layer, top_k 3, a batch of 4 x 256 tokens, fp32,
under ``torch.inference_mode``. Every configuration runs in a fresh Python process.

Measured, per configuration:
- build s (disk): read E PEFT folders from disk + ``build_router`` (exact prototypes); for PEFT,
  ``create_arrow_model``. PEFT computes its prototypes lazily in the first forward: that is in the
  "first forward" column, not in its build.
- build s (mem): ``build_router`` alone, from tensors already in memory (what the catalog will call).
- steady forward s: median of ``--repeats`` forwards after one warm-up (min in brackets: the machine
  is shared, the minimum is the least disturbed run).
- forward CPU s: median process CPU time of the same forwards (all threads; less sensitive to other
  processes on a shared machine than wall time, but it counts OpenMP spin-waiting).
- tokens/s: 1024 / steady forward.
- extra MB: peak resident memory during one steady forward above the resident memory just before it
  (Linux: VmHWM is reset through /proc/self/clear_refs, then read after the forward; glibc's mmap
  threshold is pinned at 64 KiB so freed tensors go back to the OS and the peak is not hidden by a
  warm heap). Router weights are listed separately ("weights MB").

On a shared machine run with ``--threads 1``: with two threads on two busy cores every parallel region
can wait a scheduler quantum for its second thread, which inflates runs of many small ops (both
routers' and PEFT's) far beyond their cost on a quiet machine.

Floors: the base model alone, and base + one LoRA (PEFT, unmerged). PEFT is skipped above
``--peft-max`` experts (its build grows with E^2: ~65 s at E=128, i.e. > 3 minutes at E=256).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH, SEQ, TOP_K = 4, 256, 3
CMP_BATCH, CMP_SEQ, PROMPT, NEW = 2, 256, 16, 32  # the router comparison's shapes


# -- measurements inside one worker process -------------------------------------------------------


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _forward_stats(model: Any, ids: Any, repeats: int) -> dict[str, float]:
    import gc

    import torch

    times, cpu = [], []
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(ids)
        first = time.perf_counter() - t0
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            model(ids)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        gc.collect()
        before = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            model(ids)
            extra = _status("VmHWM") - before
        except OSError:
            extra = float("nan")
    return {
        "first": first,
        "forward": statistics.median(times),
        "forward_min": min(times),
        "forward_cpu": statistics.median(cpu),
        "extra_mb": extra,
    }


def worker(kind: str, E: int, adapters: Path, repeats: int, threads: int = 0) -> dict[str, Any]:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from benchmarks.peft_reference import (
        bench_model,
        load_peft_folder,
        peft_arrow,
        peft_single_lora,
    )
    from libstore.router.build import build_router

    base = bench_model()
    ids = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    paths = sorted(adapters.glob("expert_*"))[:E]
    out: dict[str, Any] = {"kind": kind, "E": E, "threads": torch.get_num_threads()}
    if kind == "base":
        out.update(_forward_stats(base, ids, repeats))
    elif kind == "lora1":
        t0 = time.perf_counter()
        model = peft_single_lora(base, paths[0])
        out["build_disk"] = time.perf_counter() - t0
        out.update(_forward_stats(model, ids, repeats))
    elif kind == "ours":
        t0 = time.perf_counter()
        experts = [load_peft_folder(p) for p in paths]
        t1 = time.perf_counter()
        routed = build_router(base, experts, top_k=TOP_K)
        t2 = time.perf_counter()
        out["build_disk"] = t2 - t0
        out["build_mem"] = t2 - t1
        out["weights_mb"] = (
            sum(
                (layer.lora_A.numel() + layer.lora_Bt.numel() + layer.prototypes.numel()) * 4
                for layer in routed.layers.values()
            )
            / 2**20
        )
        out.update(_forward_stats(routed.model, ids, repeats))
        picked = sorted({layer._last_strategy or "?" for layer in routed.layers.values()})
        out["strategy"] = "+".join(picked)
    elif kind == "peft":
        t0 = time.perf_counter()
        model = peft_arrow(base, paths, top_k=TOP_K)
        out["build_disk"] = time.perf_counter() - t0
        out.update(_forward_stats(model, ids, repeats))
    else:
        raise SystemExit(f"unknown worker kind {kind!r}")
    return out


def router_worker(name: str, E: int, adapters: Path, repeats: int, threads: int = 0) -> dict[str, Any]:
    """One router (``arrow``, ``spectr``, ``uniform``, ``NAME/seq``) at E experts, in this process."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    from benchmarks.peft_reference import bench_model, load_peft_folder
    from libstore.router.build import build_router

    router, _, seq = name.partition("/")
    base = bench_model()
    experts = [load_peft_folder(p) for p in sorted(adapters.glob("expert_*"))[:E]]
    t0 = time.perf_counter()
    routed = build_router(
        base, experts, router=router, top_k=TOP_K, granularity="sequence" if seq else "token"
    )
    out: dict[str, Any] = {"kind": name, "E": E, "threads": torch.get_num_threads()}
    out["build_mem"] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (CMP_BATCH, CMP_SEQ), generator=gen)
    stats = _forward_stats(routed, ids, repeats)  # through the handle: sequence routing applies
    out.update(stats)
    prompt = torch.randint(0, 1000, (CMP_BATCH, PROMPT), generator=gen)
    times, cpu = [], []
    with torch.inference_mode():
        routed.generate(input_ids=prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        for _ in range(max(2, repeats // 2)):
            t0, c0 = time.perf_counter(), time.process_time()
            routed.generate(input_ids=prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    out["decode_tok_s"] = CMP_BATCH * NEW / statistics.median(times)
    out["decode_tok_cpu_s"] = CMP_BATCH * NEW / statistics.median(cpu)
    out["key_mb"] = sum(layer.prototypes.numel() * 4 for layer in routed.layers.values()) / 2**20
    return out


def routers_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| router | E | build s | × arrow | forward 2×256 s (min) | fwd CPU s | × arrow (CPU) "
        "| decode tok/s | per CPU s | × arrow (CPU) | keys MB |"
    )
    lines = [head, "|" + "---|" * 11]
    arrow = {r["E"]: r for r in rows if r["kind"] == "arrow"}
    for r in rows:
        a = arrow.get(r["E"])

        def ratio(key: str, r: dict[str, Any] = r, a: dict[str, Any] | None = a) -> str:
            return f"{r[key] / a[key]:.2f}" if a else "–"

        lines.append(
            f"| {r['kind']} | {r['E']} | {fmt(r['build_mem'])} | {ratio('build_mem')} "
            f"| {fmt(r['forward'], 3)} ({fmt(r['forward_min'], 3)}) | {fmt(r['forward_cpu'], 3)} "
            f"| {ratio('forward_cpu')} | {r['decode_tok_s']:,.0f} | {r['decode_tok_cpu_s']:,.0f} "
            f"| {ratio('decode_tok_cpu_s')} | {fmt(r['key_mb'], 1)} |"
        )
    return "\n".join(lines)


# -- the driver ---------------------------------------------------------------------------------------


def run_worker(
    kind: str, E: int, adapters: Path, repeats: int, threads: int, router: bool = False
) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--E",
        str(E),
        "--adapters",
        str(adapters),
    ]
    cmd += ["--repeats", str(repeats), "--threads", str(threads)] + (["--router-worker"] if router else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"worker {kind} E={E} failed")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall"] = time.perf_counter() - t0
    print(f"  {kind:>5} E={E:<4} done in {res['wall']:.0f} s", file=sys.stderr, flush=True)
    return res


def fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(rows: list[dict[str, Any]], floor: float) -> str:
    head = (
        "| configuration | build s (disk) | build s (mem) | first forward s | steady forward s (min) "
        "| forward CPU s | tokens/s | × base+1 LoRA | extra MB | weights MB | strategy |"
    )
    lines = [head, "|" + "---|" * 11]
    names = {"base": "base model alone", "lora1": "base + 1 LoRA (PEFT, unmerged)"}
    for r in rows:
        name = names.get(r["kind"]) or (
            f"libstore router, E = {r['E']}" if r["kind"] == "ours" else f"PEFT Arrow, E = {r['E']}"
        )
        fwd = r["forward"]
        lines.append(
            f"| {name} | {fmt(r.get('build_disk'))} | {fmt(r.get('build_mem'))} | {fmt(r['first'])} "
            f"| {fmt(fwd, 3)} ({fmt(r['forward_min'], 3)}) | {fmt(r['forward_cpu'], 3)} "
            f"| {BATCH * SEQ / fwd:,.0f} | {fwd / floor:.2f} "
            f"| {fmt(r['extra_mb'], 0)} | {fmt(r.get('weights_mb'), 0)} | {r.get('strategy', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="E = 8, 32; PEFT only at 8; 3 repeats")
    ap.add_argument("--experts", default="8,32,128,256", help="comma-separated expert counts")
    ap.add_argument("--peft-max", type=int, default=128, help="largest E to run PEFT at")
    ap.add_argument("--repeats", type=int, default=5, help="timed forwards per configuration")
    ap.add_argument(
        "--adapters",
        type=Path,
        default=Path("/tmp/libstore-bench-router"),
        help="adapter cache",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (default: torch's own choice)",
    )
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    ap.add_argument(
        "--routers",
        help="compare these routers instead (comma-separated: arrow,spectr,uniform,arrow/seq,...)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--router-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--E", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        fn = router_worker if args.router_worker else worker
        print(json.dumps(fn(args.worker, args.E, args.adapters, args.repeats, args.threads)))
        return
    if args.routers:
        compare_routers(args)
        return

    experts = [8, 32] if args.quick else [int(e) for e in args.experts.split(",")]
    peft_max = 8 if args.quick else args.peft_max
    repeats = 3 if args.quick else args.repeats
    from benchmarks.peft_reference import bench_model, write_adapters

    print(
        f"writing {max(experts)} adapters to {args.adapters} ...",
        file=sys.stderr,
        flush=True,
    )
    write_adapters(bench_model(), args.adapters, max(experts))
    load0 = os.getloadavg()[0]
    rows = [run_worker(k, 1, args.adapters, repeats, args.threads) for k in ("base", "lora1")]
    for E in experts:
        rows.append(run_worker("ours", E, args.adapters, repeats, args.threads))
        if peft_max >= E:
            # PEFT at large E takes minutes per forward: one warm-up + 2 timed runs
            rows.append(run_worker("peft", E, args.adapters, repeats if E <= 32 else 2, args.threads))
    floor = rows[1]["forward"]
    print()
    print(table(rows, floor))
    skipped = [E for E in experts if peft_max < E]
    if skipped:
        why = "--quick" if args.quick else "its build grows with E²: > 3 minutes at E = 256"
        print(f"\nPEFT not run at E = {skipped} ({why}).")
    by = {(r["kind"], r["E"]): r for r in rows}
    print(f"\nthreads: {rows[0]['threads']}; load average at start {load0:.1f}, end {os.getloadavg()[0]:.1f}")
    for E in experts:
        ours, peft = by.get(("ours", E)), by.get(("peft", E))
        line = f"E={E}: forward {ours['forward'] / floor:.2f}× base+1 LoRA" if ours else ""
        if ours and peft:
            line += (
                f"; build {peft['build_disk'] / ours['build_disk']:.0f}× faster than PEFT (disk to model),"
                f" forward {peft['forward'] / ours['forward']:.1f}× faster"
            )
        print(line)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def compare_routers(args: argparse.Namespace) -> None:
    from benchmarks.peft_reference import bench_model, write_adapters

    experts = [int(e) for e in args.experts.split(",")]
    names = [n.strip() for n in args.routers.split(",") if n.strip()]
    write_adapters(bench_model(), args.adapters, max(experts))
    load0 = os.getloadavg()[0]
    rows = [
        run_worker(n, E, args.adapters, args.repeats, args.threads, router=True)
        for E in experts
        for n in names
    ]
    print()
    print(routers_table(rows))
    print(f"\nthreads: {rows[0]['threads']}; load average at start {load0:.1f}, end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
