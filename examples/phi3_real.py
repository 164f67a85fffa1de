"""libstore on a real model: Phi-3-mini with a published library of LoRA experts (not run in CI).

The same steps as ``examples/demo.py``, on ``microsoft/Phi-3-mini-4k-instruct`` with adapters you
name on the command line: import them from the Hub into a library, compute exact Arrow prototypes,
derive GenKnowSub residuals (task experts minus the mean of the general-knowledge experts), build an
Arrow-routed model on a GPU in bf16, answer a prompt and show which experts each layer chose.

An adapter is a Hub repo id, optionally followed by a subfolder (the convention of PEFT's
``create_arrow_model``): ``owner/repo`` or ``owner/repo/sub/folder``. For example, with the adapters
of the GenKnowSub paper (10 MBC cluster experts trained on FLAN, and general experts trained on
English, French and German Wikipedia)::

    python examples/phi3_real.py \\
        --experts TahaBa/phi3-mini-clustered-flan/ts_expert_{0..9} --kind cluster \\
        --general TahaBa/phi3-mini-general-adapters/cluster0_batch16_prop1.0_langen/checkpoint-17 \\
                  TahaBa/phi3-mini-general-adapters/cluster0_batch16_prop1.0_langfr/checkpoint-35 \\
                  TahaBa/phi3-mini-general-adapters/cluster0_batch16_prop1.0_langger/checkpoint-17 \\
        --library ./phi3-library --device cuda --explain routing.png

Needs network access to the Hub (``HF_TOKEN`` for private repos), about 8 GB of GPU memory for the
bf16 model, and ``pip install libstore``. Re-running it reuses everything already in the library:
imports are skipped for names that exist, prototypes and residuals come from the cache.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BASE_ID = "microsoft/Phi-3-mini-4k-instruct"
BASE_NAME = "phi3-mini"
DEFAULT_PROMPT = "Question: Which is heavier, a kilogram of feathers or a kilogram of iron?\nAnswer:"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--experts",
        nargs="+",
        required=True,
        metavar="ID",
        help="task (or cluster) adapters: owner/repo[/subfolder] ...",
    )
    p.add_argument(
        "--general",
        nargs="*",
        default=[],
        metavar="ID",
        help="general-knowledge adapters for GenKnowSub: owner/repo[/subfolder] ...",
    )
    p.add_argument(
        "--kind",
        choices=("task", "cluster"),
        default="task",
        help="kind recorded for --experts (default: task)",
    )
    p.add_argument(
        "--library",
        type=Path,
        default=Path("phi3-library"),
        help="library folder, created if missing (default: ./phi3-library)",
    )
    p.add_argument("--base", default=BASE_ID, help=f"base model id or folder (default: {BASE_ID})")
    p.add_argument("--revision", default=None, help="revision of every adapter repo (default: main)")
    p.add_argument("--device", default="cuda", help="device of the routed model (default: cuda)")
    p.add_argument("--top-k", type=int, default=3, help="experts per token (default: 3)")
    p.add_argument(
        "--gks-mode",
        choices=("param", "delta"),
        default="param",
        help="GenKnowSub: subtract mean A and B (param, as PEFT) or mean ΔW (delta, exact)",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt to answer")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--explain",
        type=Path,
        default=Path("phi3-routing.png"),
        help="where to save the routing heatmap (default: ./phi3-routing.png)",
    )
    return p.parse_args(argv)


@contextmanager
def step(title: str) -> Iterator[None]:
    print(f"\n== {title}", flush=True)
    t0 = time.perf_counter()
    yield
    print(f"   ({time.perf_counter() - t0:.1f} s)")


def split_hub_path(spec: str) -> tuple[str, str | None]:
    """``owner/repo/sub/folder`` -> (``owner/repo``, ``sub/folder``); no subfolder -> None."""
    parts = spec.strip("/").split("/")
    if len(parts) < 2:
        raise SystemExit(f"error: {spec!r} is not a Hub repo id (owner/repo[/subfolder])")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def expert_name(spec: str) -> str:
    """A readable, unique-enough catalog name: the subfolder without a trailing ``checkpoint-N``
    (``.../langfr/checkpoint-35`` -> ``..._langfr``), else the repo name."""
    repo, sub = split_hub_path(spec)
    parts = (sub or repo.split("/")[1]).split("/")
    if len(parts) > 1 and re.fullmatch(r"checkpoint-\d+", parts[-1]):
        parts = parts[:-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-._")[:100]


def import_adapters(lib: Any, specs: Sequence[str], *, kind: str, revision: str | None) -> list[str]:
    """``lib.import_hub`` each adapter (hash-checked, validated like ``add``); skip names present."""
    have = {e.name for e in lib.experts()}
    names = []
    for spec in specs:
        repo, sub = split_hub_path(spec)
        name = expert_name(spec)
        if name in have:
            print(f"  {name}: already in the library")
        else:
            e = lib.import_hub(repo, subfolder=sub, revision=revision, name=name, kind=kind, base=BASE_NAME)
            print(f"  {e.name}: rank {e.rank}, {len(e.modules)} modules, sha256 {e.sha256[:12]}")
        names.append(name)
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from libstore import Library

    with step(f"library at {args.library}"):
        lib = (
            Library.open(args.library)
            if (args.library / "library.json").exists()
            else Library.init(args.library)
        )
        if BASE_NAME not in {b.name for b in lib.bases()}:
            lib.add_base(BASE_NAME, args.base)  # reads the config only
        print(f"  base {BASE_NAME}: {lib.base(BASE_NAME).source}")

    with step("import the adapters from the Hub"):
        experts = import_adapters(lib, args.experts, kind=args.kind, revision=args.revision)
        general = import_adapters(lib, args.general, kind="general", revision=args.revision)

    with step("exact Arrow prototypes (cached by content hash)"):
        report = lib.compute_prototypes(experts, device=args.device)
        print(f"  {len(report.computed)} computed, {len(report.cached)} already cached")

    routed_names = experts
    if general:
        with step(f"GenKnowSub residuals ({args.gks_mode} mode)"):
            gks = lib.subtract_general(
                general=general, experts=experts, mode=args.gks_mode, device=args.device
            )
            routed_names = [item.residual for item in gks.items]
            print(
                f"  {len(gks.created)} created, {len(gks.reused)} reused: "
                f"{', '.join(routed_names[:4])}{', ...' if len(routed_names) > 4 else ''}"
            )
            lib.compute_prototypes(routed_names, device=args.device)

    with step(f"routed model on {args.device} (bf16), top_k={args.top_k}, {len(routed_names)} experts"):
        tokenizer = AutoTokenizer.from_pretrained(args.base)
        base = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16).to(args.device)
        model = lib.routed_model(
            base, experts=routed_names, top_k=args.top_k, device=args.device, dtype=torch.bfloat16
        )
        print(f"  {model!r}")

    with step("generate, with the routing traced"):
        inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
        with torch.no_grad(), model.explain() as trace:
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        answer = str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        print(f"  prompt: {args.prompt!r}\n  answer: {answer.strip()!r}")
        names, usage = trace.usage(by="layer")
        print("  most used experts per layer (share of routing weight):")
        for name, row in zip(names, usage, strict=True):
            top = torch.topk(row, min(3, row.numel()))
            print(
                f"    {name:<10} "
                + ", ".join(
                    f"{trace.experts[i]} {v:.2f}"
                    for v, i in zip(top.values, top.indices.tolist(), strict=True)
                )
            )
        print(f"  heatmap: {trace.plot(args.explain, by='layer')}")
    lib.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
