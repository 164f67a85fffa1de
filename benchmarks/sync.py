"""Benchmark of Hub sync: push and pull a 200-expert library, change one expert, push and pull again.

    python benchmarks/sync.py                 # 200 rank-8 experts on all 7 Linear modules, 4 layers
    python benchmarks/sync.py --experts 50    # smaller

Runs the real ``huggingface_hub`` client against the Hub stand-in of the test suite
(tests/hubserver.py, on 127.0.0.1), so the numbers measure libstore plus the client and HTTP, not a
real network. Prints a markdown table: files and bytes moved and wall time per step, with the
server's own counters (commits, LFS uploads, file downloads) as a cross-check of incrementality.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libstore import Library
from tests.factories import LLAMA_TARGETS, make_adapter, make_base_model
from tests.hubserver import HubServer, patch_hf_client

REPO = "tester/bench-library"


class _Env:
    """What ``patch_hf_client`` needs from pytest's monkeypatch, for a script."""

    def setenv(self, key: str, value: str) -> None:
        import os

        os.environ[key] = value

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        setattr(obj, name, value)


def _make_library(root: Path, base: Path, n: int, rank: int) -> Library:
    """n distinct rank-``rank`` experts: one made by PEFT, the others its tensors re-drawn."""
    import torch
    from safetensors.torch import load_file, save_file

    proto = make_adapter(base, root / "proto", r=rank, alpha=2 * rank, targets=LLAMA_TARGETS, seed=0)
    tensors = load_file(proto / "adapter_model.safetensors")
    src = root / "adapters"
    for i in range(n):
        out = src / f"task_{i:03d}"
        out.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        save_file(
            {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in tensors.items()},
            str(out / "adapter_model.safetensors"),
        )
        shutil.copyfile(proto / "adapter_config.json", out / "adapter_config.json")
    lib = Library.init(root / "lib_a")
    lib.add_base("small", str(base))
    lib.import_dir(src, kind="task", task_from_name=True)
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=200)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()

    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    root = Path(tempfile.mkdtemp(prefix="libstore-bench-sync-"))
    try:
        base = make_base_model(
            root / "base",
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
        t0 = time.perf_counter()
        a = _make_library(root, base, args.experts, args.rank)
        setup_s = time.perf_counter() - t0
        b = Library.init(root / "lib_b")
        rows: list[list[str]] = []
        with HubServer() as server:
            patch_hf_client(_Env(), server.url, root / "hf_home")
            a.add_remote("origin", REPO)
            b.add_remote("origin", REPO)

            def step(label: str, fn: Any) -> Any:
                server.reset_stats()
                t = time.perf_counter()
                report = fn()
                wall = time.perf_counter() - t
                c = server.counts
                if hasattr(report, "files_uploaded"):
                    files, size, extra = (
                        report.files_uploaded,
                        report.bytes_uploaded,
                        f"{report.commits} commit(s)",
                    )
                else:
                    files, size = report.files_downloaded, report.bytes_downloaded
                    extra = (
                        f"{report.files_reused} reused; {len(report.added)} added, "
                        f"{len(report.updated)} updated"
                    )
                rows.append(
                    [
                        label,
                        str(files),
                        f"{size / 1e6:.2f} MB",
                        f"{wall:.2f} s",
                        extra,
                        f"{c['commit']} / {c['lfs_upload']} / {c['download']}",
                    ]
                )
                return report

            step(f"push {args.experts} experts", a.push)
            step(f"pull {args.experts} experts", b.pull)
            step("push, nothing changed", a.push)
            victim = "task_042" if args.experts > 42 else "task_000"
            a.remove(victim)
            changed = make_adapter(
                base, root / "changed", r=args.rank, alpha=2 * args.rank, targets=LLAMA_TARGETS, seed=999
            )
            a.add(changed, name=victim, kind="task", tasks=[victim])
            step("push after changing 1 expert", a.push)
            step("pull after changing 1 expert", b.pull)
            assert b.get(victim).sha256 == a.get(victim).sha256
            assert b.status().counts == {"in_sync": args.experts}
        a.close()
        b.close()
        e = Library.open(root / "lib_a")
        one = e.experts()[0]
        e.close()
        print(
            f"## Hub sync, {args.experts} experts of rank {args.rank} ({len(one.modules)} LoRA modules, "
            f"{one.bytes / 1e3:.0f} kB each); library built in {setup_s:.1f} s"
        )
        print(
            f"\n{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
            f"huggingface_hub {_hf_version()}, local Hub stand-in on 127.0.0.1\n"
        )
        print("| step | files | bytes | wall time | notes | server: commits / LFS uploads / file GETs |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print("| " + " | ".join(r) + " |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _hf_version() -> str:
    import huggingface_hub

    return huggingface_hub.__version__


if __name__ == "__main__":
    main()
