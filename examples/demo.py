"""libstore end to end on a tiny model, offline, in a few minutes on a laptop CPU.

What it does, in order (each step prints its wall time):

1. **Base model.** A word-level tokenizer and a tiny Llama (from a config) are made here and
   pre-trained briefly on *general* data: sequences in every task's format and alphabet whose answers
   are random, so the base knows the format and the vocabulary but none of the tasks.
2. **Experts.** One synthetic task per alphabet (copy, reverse, shift, mirror, ...): ``<task> x1..xL =
   y1..yL </s>`` where every task has its own tokens, so their hidden states differ in distribution.
   One LoRA per task (PEFT, rank 8, all attention and MLP Linear layers), plus "general" LoRAs trained
   on more general data (the stand-ins for the paper's Wikipedia adapters), saved as PEFT folders.
3. **Library.** A fresh libstore library: the base, the task experts and the general experts; MBC
   clustering of the task experts; GenKnowSub residuals (task minus mean general); exact Arrow
   prototypes.
4. **Hub round trip.** The Hub stand-in of the test suite (``tests/hubserver.py``) runs on 127.0.0.1;
   the library is pushed to ``demo/tiny-experts`` and pulled into a second, empty library: every routed
   model below is built from that *clone*.
5. **Routing.** Held-out inputs of every task go through routed models built from catalog queries:
   Arrow's routing accuracy (is a token's top-1 expert its task's own expert?) per task, as a table and
   a confusion-matrix PNG; and held-out answer accuracy of the base model, the right single expert
   (oracle), the uniform average of all task experts, Arrow, and Arrow over GenKnowSub residuals.

Every number printed is computed in this run; results go to ``--out`` (PNGs and ``results.json``).

    python examples/demo.py                 # the full demo (about 2-4 minutes on 2 CPU cores)
    python examples/demo.py --quick         # a smoke run for the test suite (well under 90 s)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests/hubserver.py (the Hub stand-in), and libstore if not installed

from libstore import Library  # noqa: E402

ALPHABET = 10  # symbols per task
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Sizes and step counts; ``--quick`` shrinks them."""

    tasks: tuple[str, ...]
    n_general: int
    hidden: int
    layers: int
    length: int  # symbols per input
    base_steps: int
    expert_steps: int
    general_steps: int
    batch: int
    held_out: int  # held-out sequences per task
    rank: int = 8
    top_k: int = 2

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(tasks=("copy", "reverse", "shift", "mirror"), n_general=2, hidden=64, layers=2,
                       length=5, base_steps=150, expert_steps=120, general_steps=60, batch=32,
                       held_out=32)
        return cls(tasks=tuple(OPERATIONS), n_general=3,
                   hidden=96, layers=3, length=6, base_steps=400, expert_steps=300, general_steps=150,
                   batch=32, held_out=64)


# --- tasks and data ------------------------------------------------------------------------------
#
# Each task lives in its own little language: ten digits, a question mark and an equals sign of its
# own ("a0".."a9", "a?", "a=" for the first task, "b0".."b9", "b?", "b=" for the next, ...).
# General data (what the base model and the general experts learn from) names an operation --
# "<reverse> b3 b1 b4 b= b4 b1 b3 </s>" -- in any language: the base learns the skills. Task data
# has no instruction, only the language's own "?" -- "b? b3 b1 b4 b= b4 b1 b3 </s>" is task
# `reverse` -- so a task expert learns which skill its inputs call for, the way a real task adapter
# learns a task on top of a base model's knowledge. The base alone cannot know what "?" asks for:
# in general data a "?" is followed by a random answer.

OPERATIONS: dict[str, Callable[[list[int]], list[int]]] = {
    "copy": lambda x: list(x),
    "reverse": lambda x: x[::-1],
    "shift": lambda x: [(v + 1) % ALPHABET for v in x],
    "mirror": lambda x: [ALPHABET - 1 - v for v in x],
    "rotate": lambda x: x[1:] + x[:1],
    "double": lambda x: [2 * v % ALPHABET for v in x],
}


def language(task: str) -> str:
    """The letter of the task's language: ``copy`` -> a, ``reverse`` -> b, ..."""
    return "abcdefghij"[list(OPERATIONS).index(task)]


def vocabulary(task: str) -> list[str]:
    letter = language(task)
    return [*(f"{letter}{i}" for i in range(ALPHABET)), f"{letter}?", f"{letter}="]


def render(marker: str | None, lang: str, x: list[int], y: list[int]) -> str:
    """``marker`` is an instruction (``<copy>``) or ``None`` for the language's own ``?``."""
    c = language(lang)
    return " ".join([marker or f"{c}?", *(f"{c}{v}" for v in x), f"{c}=", *(f"{c}{v}" for v in y),
                     "</s>"])


def example(task: str, rng: random.Random, length: int) -> str:
    """One sequence of ``task``: no instruction, an input in the task's language, the answer."""
    x = [rng.randrange(ALPHABET) for _ in range(length)]
    return render(None, task, x, OPERATIONS[task](x))


def general_example(tasks: Sequence[str], rng: random.Random, length: int) -> str:
    """General data: an instructed operation in any language, or (1 in 5) a ``?`` with a random
    answer."""
    op, lang = rng.choice(tasks), rng.choice(tasks)
    x = [rng.randrange(ALPHABET) for _ in range(length)]
    if rng.random() < 0.2:
        return render(None, lang, x, [rng.randrange(ALPHABET) for _ in range(length)])
    return render(f"<{op}>", lang, x, OPERATIONS[op](x))


def held_out_inputs(tasks: Sequence[str], n: int, length: int, seed: int) -> dict[str, list[str]]:
    """``n`` sequences per task from their own seed; training draws from other seeds."""
    return {t: [example(t, random.Random(f"held-out/{seed}/{t}/{i}"), length) for i in range(n)]
            for t in tasks}


def batches(make: Callable[[random.Random], str], steps: int, batch: int, seed: int,
            exclude: set[str]) -> Iterator[list[str]]:
    rng = random.Random(seed)
    for _ in range(steps):
        out: list[str] = []
        while len(out) < batch:
            s = make(rng)
            if s not in exclude:
                out.append(s)
        yield out


# --- step 1: tokenizer and base model ------------------------------------------------------------


def make_tokenizer(tasks: Sequence[str]) -> Any:
    """A word-level tokenizer: specials, the markers and every alphabet."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, *(f"<{op}>" for op in OPERATIONS), *(w for op in OPERATIONS for w in vocabulary(op))]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def make_base(tokenizer: Any, cfg: Settings) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
        num_hidden_layers=cfg.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    lang_scale = float(os.environ.get("DEMO_LANG", "0"))
    if lang_scale:
        emb = model.get_input_embeddings().weight
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for op in OPERATIONS:
                ids = tokenizer.convert_tokens_to_ids(vocabulary(op))
                emb[ids] += lang_scale * emb.std() * torch.randn(emb.shape[1], generator=g)
    return model


def encode(tokenizer: Any, texts: Sequence[str]) -> Tensor:
    """Token ids (batch, seq); every sequence of a run has the same length, so no padding."""
    ids = [tokenizer.convert_tokens_to_ids(t.split()) for t in texts]
    return torch.tensor(ids, dtype=torch.long)


def answer_mask(ids: Tensor) -> Tensor:
    """True at positions whose *next* token is part of the answer (after ``=``, up to ``</s>``)."""
    L = (ids.shape[1] - 3) // 2  # <task> x1..xL = y1..yL </s>
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, L + 1 : 2 * L + 2] = True
    return mask


def train(model: nn.Module, tokenizer: Any, data: Iterator[list[str]], steps: int, lr: float,
          desc: str, *, answer_only: bool) -> float:
    """AdamW with a linear decay; loss on the answer tokens only, or on every token (pre-training)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    loss_value = float("nan")
    with tqdm(data, total=steps, desc=desc, leave=False, mininterval=0.5) as bar:
        for texts in bar:
            ids = encode(tokenizer, texts)
            logits = model(input_ids=ids).logits[:, :-1]
            target = ids[:, 1:]
            if answer_only:
                target = target.masked_fill(~answer_mask(ids)[:, :-1], -100)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    model.eval()
    return loss_value


def pretrain_base(work: Path, cfg: Settings, exclude: set[str]) -> tuple[Path, Any]:
    tokenizer = make_tokenizer(cfg.tasks)
    model = make_base(tokenizer, cfg)

    def general(rng: random.Random) -> str:
        return general_example(cfg.tasks, rng, cfg.length)

    loss = train(model, tokenizer, batches(general, cfg.base_steps, cfg.batch, 1, exclude),
                 cfg.base_steps, 3e-3, "pre-train base", answer_only=False)
    path = work / "base"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(f"  base: {n / 1e3:.0f}k parameters, final LM loss {loss:.3f} -> {path}")
    return path, tokenizer


# --- step 2: LoRA experts ------------------------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_lora(base: Path, tokenizer: Any, data: Iterator[list[str]], steps: int, out: Path,
               cfg: Settings, desc: str, seed: int) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    lora = LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    loss = train(peft_model, tokenizer, data, steps, 3e-3, desc, answer_only=True)
    peft_model.save_pretrained(out)
    return loss


def train_experts(base: Path, tokenizer: Any, work: Path, cfg: Settings,
                  exclude: set[str]) -> tuple[dict[str, Path], dict[str, Path]]:
    """One LoRA per task, and ``n_general`` general LoRAs (each on its own stream of general data)."""
    task_dirs: dict[str, Path] = {}
    for i, task in enumerate(cfg.tasks):
        def make(rng: random.Random, task: str = task) -> str:
            return example(task, rng, cfg.length)

        task_dirs[task] = work / "adapters" / task
        loss = train_lora(base, tokenizer, batches(make, cfg.expert_steps, cfg.batch, 100 + i, exclude),
                          cfg.expert_steps, task_dirs[task], cfg, f"LoRA {task}", seed=i)
        print(f"  task expert {task:<8} final loss {loss:.3f}")
    general_dirs: dict[str, Path] = {}
    for g in range(cfg.n_general):
        def general(rng: random.Random) -> str:
            return general_example(cfg.tasks, rng, cfg.length)

        name = f"general{g}"
        general_dirs[name] = work / "adapters" / name
        loss = train_lora(base, tokenizer, batches(general, cfg.general_steps, cfg.batch, 200 + g, exclude),
                          cfg.general_steps, general_dirs[name], cfg, f"LoRA {name}", seed=50 + g)
        print(f"  general expert {name} final loss {loss:.3f}")
    return task_dirs, general_dirs


# --- step 3: the library -------------------------------------------------------------------------


def build_library(work: Path, base: Path, task_dirs: dict[str, Path],
                  general_dirs: dict[str, Path], out: Path) -> tuple[Library, dict[str, Any]]:
    lib = Library.init(work / "library")
    lib.add_base("tiny", str(base))
    for task, path in task_dirs.items():
        lib.add(path, name=task, kind="task", tasks=[task], tags=["demo"])
    for name, path in general_dirs.items():
        lib.add(path, name=name, kind="general", tags=["demo"])
    print(f"  {len(lib.experts())} experts in {lib.path}")

    clustering = lib.cluster("kind=task", metric="delta", seed=0)
    print(f"  MBC ({clustering.metric} cosine, k={clustering.k} by silhouette):")
    for c in clustering.clusters:
        print(f"    cluster {c.index}: {', '.join(c.members)}")
    lib.plot_clustering(clustering.name, out / "clusters.png")

    sim = lib.similarity("kind=task", metric="delta")
    lib.plot_similarity(sim, out / "similarity.png")

    gks = lib.subtract_general(general="kind=general", experts="kind=task")
    print(f"  GenKnowSub: {', '.join(gks.created)} = task - mean({', '.join(gks.general)})")
    report = lib.compute_prototypes("kind=task,residual")
    print(f"  exact Arrow prototypes: {_describe(report)}")
    summary = {
        "experts": [e.name for e in lib.experts()],
        "clustering": {"name": clustering.name, "k": clustering.k,
                       "clusters": [list(c.members) for c in clustering.clusters]},
        "residuals": list(gks.created),
    }
    return lib, summary


def _describe(report: Any) -> str:
    parts = []
    for field in ("computed", "cached"):
        value = getattr(report, field, None)
        if value is not None:
            parts.append(f"{len(value)} {field}")
    return ", ".join(parts) or str(report)


# --- step 4: Hub round trip ----------------------------------------------------------------------


class _Env:
    """What ``tests.hubserver.patch_hf_client`` needs from pytest's monkeypatch, with an undo."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setenv(self, key: str, value: str) -> None:
        old = os.environ.get(key)
        os.environ[key] = value
        self._undo.append(lambda: os.environ.__setitem__(key, old) if old is not None
                          else os.environ.pop(key, None))

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextmanager
def local_hub(home: Path) -> Iterator[str]:
    """The Hub stand-in on 127.0.0.1, with this process's ``huggingface_hub`` pointed at it."""
    from tests.hubserver import HubServer, patch_hf_client

    env = _Env()
    with HubServer(user="demo") as server:
        patch_hf_client(env, server.url, home)
        try:
            yield server.url
        finally:
            env.undo()


def hub_round_trip(lib: Library, work: Path) -> tuple[Library, dict[str, Any]]:
    with local_hub(work / "hf_home") as url:
        lib.add_remote("origin", "demo/tiny-experts")
        pushed = lib.push("origin", message="tiny demo library")
        print(f"  pushed {pushed.files_uploaded} files ({pushed.bytes_uploaded / 1e6:.1f} MB) to "
              f"{url}/demo/tiny-experts @ {pushed.commit[:8]}")
        clone = Library.init(work / "clone")
        clone.add_remote("origin", "demo/tiny-experts")
        pulled = clone.pull("origin")
        print(f"  pulled into {clone.path}: {len(pulled.added)} experts, {pulled.files_downloaded} files, "
              f"{pulled.prototypes} prototype sets")
    return clone, {"pushed_files": pushed.files_uploaded, "commit": pushed.commit,
                   "pulled_experts": len(pulled.added), "pulled_prototypes": pulled.prototypes}


# --- step 5: routing and accuracy ----------------------------------------------------------------


@dataclass
class Evaluation:
    """Held-out results of one model: per task, answer-token accuracy and exact match."""

    token_acc: dict[str, float]
    exact: dict[str, float]
    routing: dict[str, float] | None = None  # token-level routing accuracy (Arrow models)
    routing_seq: dict[str, float] | None = None  # sequence-level (majority over tokens x modules)
    confusion: list[list[float]] | None = None  # task x expert share of top-1 choices

    def mean(self, field: str) -> float:
        values = getattr(self, field)
        return sum(values.values()) / len(values)


def score(logits: Tensor, ids: Tensor) -> tuple[float, float]:
    """Answer-token accuracy under teacher forcing, and exact match (= greedy decoding is right)."""
    mask = answer_mask(ids)[:, :-1]
    correct = (logits[:, :-1].argmax(-1) == ids[:, 1:]) | ~mask
    token = correct[mask].float().mean().item()
    exact = correct.all(dim=1).float().mean().item()
    return token, exact


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, held_out: dict[str, list[str]],
             own_expert: dict[str, str] | None = None) -> Evaluation:
    """Run every task's held-out batch; with ``own_expert`` (expert -> task), also read the routing."""
    token_acc, exact, routing, routing_seq, confusion = {}, {}, {}, {}, []
    for task, texts in held_out.items():
        ids = encode(tokenizer, texts)
        if own_expert is None:
            logits = model(input_ids=ids).logits
        else:
            with model.explain() as trace:
                logits = model(input_ids=ids).logits
            top1 = torch.stack([trace.tokens(m)[0][:, 0] for m in model.layers])  # (modules, B*T)
            own = torch.tensor([own_expert[e] == task for e in trace.experts])
            hits = own[top1].reshape(len(model.layers), ids.shape[0], ids.shape[1])
            routing[task] = hits.float().mean().item()
            votes = torch.nn.functional.one_hot(top1.reshape(len(model.layers), ids.shape[0], -1),
                                                len(trace.experts)).sum(dim=(0, 2))  # (B, E)
            routing_seq[task] = own[votes.argmax(-1)].float().mean().item()
            share = torch.bincount(top1.reshape(-1), minlength=len(trace.experts)).float()
            confusion.append((share / share.sum()).tolist())
        token_acc[task], exact[task] = score(logits, ids)
    if own_expert is None:
        return Evaluation(token_acc, exact)
    return Evaluation(token_acc, exact, routing, routing_seq, confusion)


def load_base(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def route_and_evaluate(clone: Library, base: Path, tokenizer: Any, held_out: dict[str, list[str]],
                       cfg: Settings, out: Path) -> tuple[dict[str, Evaluation], dict[str, list[str]]]:
    """Every model of the comparison, built from the clone's catalog by queries."""
    task_of = {e.name: e.tasks[0] for e in clone.experts("kind=task,residual")}
    results: dict[str, Evaluation] = {"base": evaluate(load_base(base), tokenizer, held_out)}

    oracle_tok, oracle_exact = {}, {}
    for task in held_out:  # the right single expert: a router over that expert alone
        single = clone.routed_model(base, experts=[task], top_k=1)
        ev = evaluate(single, tokenizer, {task: held_out[task]})
        oracle_tok[task], oracle_exact[task] = ev.token_acc[task], ev.exact[task]
    results["oracle"] = Evaluation(oracle_tok, oracle_exact)

    n = len(clone.experts("kind=task"))
    uniform = clone.routed_model(base, experts="kind=task", top_k=n, temperature=1e9)
    results["uniform"] = evaluate(uniform, tokenizer, held_out)

    experts_of: dict[str, list[str]] = {}
    for label, query in (("arrow", "kind=task"), ("arrow+gks", "kind=residual")):
        routed = clone.routed_model(base, experts=query, top_k=cfg.top_k)
        results[label] = evaluate(routed, tokenizer, held_out, own_expert=task_of)
        experts_of[label] = list(routed.experts)
        if label == "arrow":
            with routed.explain() as trace:  # one mixed batch: the library's own routing plot
                routed(input_ids=encode(tokenizer, [texts[0] for texts in held_out.values()]))
            experts_of["trace"] = [str(trace.plot(out / "routing_by_module.png"))]
    return results, experts_of


# --- reporting -----------------------------------------------------------------------------------


def print_tables(results: dict[str, Evaluation], tasks: Sequence[str], top_k: int) -> str:
    lines = []
    w = max(8, *(len(t) for t in tasks))
    header = f"{'':<22}" + "".join(f"{t:>{w + 1}}" for t in tasks) + f"{'mean':>{w + 1}}"
    lines.append(f"Routing accuracy (share of held-out tokens x routed modules whose top-1 expert is the"
                 f" task's own; chance = {1 / len(tasks):.2f}; top_k = {top_k})")
    lines.append(header)
    for label in ("arrow", "arrow+gks"):
        ev = results[label]
        for field, name in (("routing", "token"), ("routing_seq", "sequence (majority)")):
            values = getattr(ev, field)
            lines.append(f"{label + ' ' + name:<22}" + "".join(f"{values[t]:>{w + 1}.2f}" for t in tasks)
                         + f"{ev.mean(field):>{w + 1}.2f}")
    lines.append("")
    lines.append("Held-out accuracy: answer tokens (teacher forced) / exact match of the whole answer")
    lines.append(header)
    for label, ev in results.items():
        row = "".join(f"{ev.token_acc[t]:>{w - 4}.2f}/{ev.exact[t]:.2f}"[-(w + 1):].rjust(w + 1)
                      for t in tasks)
        lines.append(f"{label:<22}{row}" + f"{ev.mean('token_acc'):.2f}/{ev.mean('exact'):.2f}".rjust(w + 1))
    text = "\n".join(lines)
    print(text)
    return text


def plot_confusion(results: dict[str, Evaluation], experts_of: dict[str, list[str]],
                   tasks: Sequence[str], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = ["arrow", "arrow+gks"]
    fig = Figure(figsize=(5.2 * len(labels), 4.6))
    FigureCanvasAgg(fig)
    for i, label in enumerate(labels):
        ax = fig.add_subplot(1, len(labels), i + 1)
        mat = torch.tensor(results[label].confusion)
        im = ax.imshow(mat.numpy(), vmin=0, vmax=1, cmap="Blues")
        for r in range(mat.shape[0]):
            for c in range(mat.shape[1]):
                ax.text(c, r, f"{mat[r, c]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if mat[r, c] > 0.5 else "black")
        ax.set_xticks(range(mat.shape[1]), experts_of[label], rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_xlabel("top-1 expert chosen (tokens x modules)")
        ax.set_ylabel("held-out task")
        ax.set_title(f"{label}: routing accuracy {results[label].mean('routing'):.2f}")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_accuracy(results: dict[str, Evaluation], tasks: Sequence[str], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.4 + 1.1 * (len(tasks) + 1), 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = list(results)
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        ev = results[label]
        values = [ev.exact[t] for t in tasks] + [ev.mean("exact")]
        ax.bar([i + j * width for i in range(len(values))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks) + 1)], [*tasks, "mean"])
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncols=len(labels), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# --- main ----------------------------------------------------------------------------------------


@contextmanager
def step(title: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n== {title}")
    t0 = time.perf_counter()
    yield
    timings[title] = round(time.perf_counter() - t0, 2)
    print(f"   ({timings[title]:.1f} s)")


def setup(seed: int) -> None:
    """Seed everything; one thread (a tiny model is bound by per-op overhead, and a second thread
    only fights other processes for the cores); no progress bars but ours."""
    from transformers.utils import logging as hf_logging

    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' and huggingface_hub's


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-output"),
                        help="folder for PNGs, results.json and the work files (default ./demo-output)")
    parser.add_argument("--quick", action="store_true", help="fewer tasks and steps: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = Settings.make(args.quick)
    out = args.out.resolve()
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    setup(args.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()

    held_out = held_out_inputs(cfg.tasks, cfg.held_out, cfg.length, args.seed)
    exclude = {s for texts in held_out.values() for s in texts}

    with step("1. tokenizer + tiny Llama, pre-trained on general data", timings):
        base, tokenizer = pretrain_base(work, cfg, exclude)
    with step(f"2. {len(cfg.tasks)} task LoRAs + {cfg.n_general} general LoRAs (PEFT)", timings):
        task_dirs, general_dirs = train_experts(base, tokenizer, work, cfg, exclude)
    with step("3. library: catalog, MBC clusters, GenKnowSub residuals, prototypes", timings):
        lib, library_summary = build_library(work, base, task_dirs, general_dirs, out)
    with step("4. push to the Hub stand-in, pull into a fresh clone", timings):
        clone, hub_summary = hub_round_trip(lib, work)
    with step("5. routed models from the clone: held-out routing and accuracy", timings):
        results, experts_of = route_and_evaluate(clone, base, tokenizer, held_out, cfg, out)
    print()
    table = print_tables(results, cfg.tasks, cfg.top_k)
    pngs = [
        str(plot_confusion(results, experts_of, cfg.tasks, out / "routing_confusion.png")),
        str(plot_accuracy(results, cfg.tasks, out / "accuracy.png")),
        *experts_of.pop("trace"),
        str(out / "clusters.png"),
        str(out / "similarity.png"),
    ]
    timings["total"] = round(time.perf_counter() - start, 2)
    output = {
        "settings": {**cfg.__dict__, "quick": args.quick, "seed": args.seed},
        "tasks": list(cfg.tasks),
        "library": library_summary,
        "hub": hub_summary,
        "experts": experts_of,
        "routing_accuracy": {label: {"per_task": results[label].routing,
                                     "mean": results[label].mean("routing"),
                                     "sequence_per_task": results[label].routing_seq,
                                     "sequence_mean": results[label].mean("routing_seq"),
                                     "confusion": results[label].confusion}
                             for label in ("arrow", "arrow+gks")},
        "accuracy": {label: {"token": ev.token_acc, "exact": ev.exact,
                             "token_mean": ev.mean("token_acc"), "exact_mean": ev.mean("exact")}
                     for label, ev in results.items()},
        "table": table,
        "pngs": pngs,
        "timings_s": timings,
    }
    (out / "results.json").write_text(json.dumps(output, indent=2))
    lib.close()
    clone.close()
    print(f"\nDone in {timings['total']:.0f} s. Results in {out}:")
    for p in [*pngs, str(out / "results.json")]:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
