"""libstore end to end on a tiny model: offline, a few minutes on a laptop CPU.

    python examples/demo.py                 # the full demo (6 tasks; about a minute on 2 idle cores)
    python examples/demo.py --quick         # a smoke run (4 tasks, fewer steps; about 20 s)
    python examples/demo.py --out DIR       # where PNGs, results.json and the work files go

The steps (each prints its wall time):

1. **Base model.** A word-level tokenizer and a tiny Llama are made here from a config and
   pre-trained on *general* data: instructed operations ("<double> b3 b1 b= b6 b2 </s>") in every
   little language of the world below. The base learns the skills.
2. **Experts.** One task per language, *without* instruction: "b? b3 b1 b= b6 b2 </s>" is task
   `double` (its language is b). The base cannot know what "?" asks for; a task expert learns it.
   One LoRA per task (PEFT, rank 8, every attention and MLP Linear layer; half of each batch is
   general data, the usual replay against forgetting), plus general LoRAs trained on general data
   only (the stand-ins for the paper's Wikipedia adapters). Saved as PEFT folders.
3. **Library.** A fresh libstore library: the base, the task and general experts; MBC clustering of
   the task experts; GenKnowSub residuals (task minus the mean of the general experts, in PEFT's
   parameter mode and in libstore's exact ΔW mode); exact Arrow prototypes.
4. **Hub round trip.** The Hub stand-in of the test suite (``tests/hubserver.py``) runs on
   127.0.0.1; the library is pushed to ``demo/tiny-experts`` and pulled into a second, empty
   library: every routed model below is built from that *clone*.
5. **Routing.** Held-out inputs of every task go through routed models built from catalog queries:
   Arrow's routing accuracy (does a token choose its task's own expert as top-1?) per task, as a
   table and a confusion-matrix PNG; and the held-out accuracy of the base model, the right single
   expert (oracle), the uniform average of all task experts, Arrow, and Arrow over the residuals.

Every number printed is computed in this run and saved to ``results.json``.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from libstore import Library

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for tests/hubserver.py, the Hub stand-in of the test suite


@dataclass(frozen=True)
class Settings:
    """Sizes and step counts; ``--quick`` shrinks them."""

    tasks: tuple[str, ...]
    n_general: int
    base_steps: int
    expert_steps: int
    general_steps: int
    held_out: int  # held-out sequences per task
    hidden: int = 64
    layers: int = 2
    length: int = 5  # symbols per input
    batch: int = 32
    rank: int = 8
    replay: float = 0.5  # share of general data in a task expert's batches
    top_k: int = 2
    lr_base: float = 3e-3
    lr_lora: float = 3e-3

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(
                tasks=("copy", "shift", "mirror", "double"),
                n_general=2,
                base_steps=1200,
                expert_steps=120,
                general_steps=60,
                held_out=32,
            )
        return cls(
            tasks=tuple(OPERATIONS),
            n_general=3,
            base_steps=3000,
            expert_steps=200,
            general_steps=150,
            held_out=64,
        )


# --- the little world: languages, operations, tasks ----------------------------------------------
#
# Each task lives in its own language: ten digits, a "?" and a "=" of its own ("a0".."a9", "a?",
# "a=" for the first task, "b0".."b9", "b?", "b=" for the next, ...). A sequence reads
#     <marker> x1 .. xL <lang>= y1 .. yL </s>
# General data names the operation in the marker ("<mirror>") over any language; task data has only
# its language's "?". In general data a "?" is followed by a random answer.

ALPHABET = 10
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
OPERATIONS: dict[str, Callable[[list[int]], list[int]]] = {
    "copy": lambda x: list(x),
    "shift": lambda x: [(v + 1) % ALPHABET for v in x],
    "mirror": lambda x: [ALPHABET - 1 - v for v in x],
    "double": lambda x: [2 * v % ALPHABET for v in x],
    "unshift": lambda x: [(v - 1) % ALPHABET for v in x],
    "triple": lambda x: [3 * v % ALPHABET for v in x],
}


def language(task: str) -> str:
    """The letter of a task's language: ``copy`` -> a, ``shift`` -> b, ..."""
    return "abcdefghij"[list(OPERATIONS).index(task)]


def vocabulary(task: str) -> list[str]:
    c = language(task)
    return [*(f"{c}{i}" for i in range(ALPHABET)), f"{c}?", f"{c}="]


def render(marker: str | None, lang: str, x: list[int], y: list[int]) -> str:
    """A sequence in ``lang``'s language; ``marker`` is an instruction, or None for its ``?``."""
    c = language(lang)
    return " ".join([marker or f"{c}?", *(f"{c}{v}" for v in x), f"{c}=", *(f"{c}{v}" for v in y), "</s>"])


def task_example(task: str, rng: random.Random, length: int) -> str:
    x = [rng.randrange(ALPHABET) for _ in range(length)]
    return render(None, task, x, OPERATIONS[task](x))


def general_example(tasks: Sequence[str], rng: random.Random, length: int) -> str:
    """An instructed operation in any language, or (1 in 5) a ``?`` with a random answer."""
    op, lang = rng.choice(tasks), rng.choice(tasks)
    x = [rng.randrange(ALPHABET) for _ in range(length)]
    if rng.random() < 0.2:
        return render(None, lang, x, [rng.randrange(ALPHABET) for _ in range(length)])
    return render(f"<{op}>", lang, x, OPERATIONS[op](x))


def held_out_inputs(tasks: Sequence[str], n: int, length: int, seed: int) -> dict[str, list[str]]:
    """``n`` sequences per task; training batches never contain one of them."""
    rng = random.Random(f"held-out/{seed}")
    return {t: [task_example(t, rng, length) for _ in range(n)] for t in tasks}


def batches(
    make: Callable[[random.Random], str], steps: int, size: int, seed: int, exclude: set[str]
) -> Iterator[list[str]]:
    rng = random.Random(seed)
    for _ in range(steps):
        batch: list[str] = []
        while len(batch) < size:
            if (s := make(rng)) not in exclude:
                batch.append(s)
        yield batch


# --- step 1: tokenizer and base model ------------------------------------------------------------


def make_tokenizer() -> Any:
    """A word-level tokenizer: specials, one instruction per operation, every language."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = [*SPECIALS, *(f"<{op}>" for op in OPERATIONS), *(w for op in OPERATIONS for w in vocabulary(op))]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def make_base(tokenizer: Any, cfg: Settings) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden,
        intermediate_size=2 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def encode(tokenizer: Any, texts: Sequence[str]) -> Tensor:
    """Token ids (batch, seq); all sequences of a run have the same length, so there is no padding."""
    return torch.tensor([tokenizer.convert_tokens_to_ids(t.split()) for t in texts], dtype=torch.long)


def answer_mask(ids: Tensor) -> Tensor:
    """True at the positions whose *next* token is part of the answer (y1 .. yL and ``</s>``)."""
    L = (ids.shape[1] - 3) // 2
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, L + 1 : 2 * L + 2] = True
    return mask


def train(
    model: nn.Module,
    tokenizer: Any,
    data: Iterator[list[str]],
    steps: int,
    lr: float,
    desc: str,
    *,
    answer_only: bool,
) -> float:
    """AdamW, linear decay; the loss on the answers only, or on every token (pre-training)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    model.train()
    loss_value = float("nan")
    with tqdm(data, total=steps, desc=f"  {desc}", leave=False, mininterval=0.5) as bar:
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
    tokenizer = make_tokenizer()
    model = make_base(tokenizer, cfg)
    data = batches(
        lambda rng: general_example(cfg.tasks, rng, cfg.length),
        cfg.base_steps,
        cfg.batch,
        seed=1,
        exclude=exclude,
    )
    loss = train(model, tokenizer, data, cfg.base_steps, cfg.lr_base, "pre-train base", answer_only=False)
    path = work / "base"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"  tiny Llama ({cfg.layers} layers, hidden {cfg.hidden}, {n / 1e3:.0f}k parameters, "
        f"vocabulary {len(tokenizer)}): {cfg.base_steps} steps, final loss {loss:.3f} -> {path}"
    )
    return path, tokenizer


# --- step 2: LoRA experts ------------------------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_INIT_SEED = 0  # every adapter starts from the same initialisation (a fixed training seed)


def train_lora(
    base: Path, tokenizer: Any, data: Iterator[list[str]], steps: int, out: Path, cfg: Settings, desc: str
) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(LORA_INIT_SEED)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=cfg.rank, lora_alpha=2 * cfg.rank, target_modules=TARGETS, lora_dropout=0.0),
    )
    loss = train(model, tokenizer, data, steps, cfg.lr_lora, desc, answer_only=True)
    model.save_pretrained(str(out))
    return loss


def train_experts(
    base: Path, tokenizer: Any, work: Path, cfg: Settings, exclude: set[str]
) -> tuple[dict[str, Path], dict[str, Path]]:
    """One LoRA per task (with general replay), and ``n_general`` LoRAs on general data alone."""
    adapters: dict[str, Path] = {}
    for i, task in enumerate(cfg.tasks):

        def make(rng: random.Random, task: str = task) -> str:
            if rng.random() < cfg.replay:
                return general_example(cfg.tasks, rng, cfg.length)
            return task_example(task, rng, cfg.length)

        adapters[task] = work / "adapters" / task
        data = batches(make, cfg.expert_steps, cfg.batch, seed=100 + i, exclude=exclude)
        loss = train_lora(base, tokenizer, data, cfg.expert_steps, adapters[task], cfg, f"LoRA {task}")
        print(f"  task expert    {task:<9} {cfg.expert_steps} steps, final loss {loss:.3f}")
    general: dict[str, Path] = {}
    for g in range(cfg.n_general):
        name = f"general{g}"
        general[name] = work / "adapters" / name
        data = batches(
            lambda rng: general_example(cfg.tasks, rng, cfg.length),
            cfg.general_steps,
            cfg.batch,
            seed=200 + g,
            exclude=exclude,
        )
        loss = train_lora(base, tokenizer, data, cfg.general_steps, general[name], cfg, f"LoRA {name}")
        print(f"  general expert {name:<9} {cfg.general_steps} steps, final loss {loss:.3f}")
    return adapters, general


# --- step 3: the library -------------------------------------------------------------------------


def build_library(
    work: Path, base: Path, adapters: dict[str, Path], general: dict[str, Path], out: Path
) -> tuple[Library, dict[str, Any]]:
    lib = Library.init(work / "library")
    lib.add_base("tiny", str(base))
    for task, path in adapters.items():
        lib.add(path, name=task, kind="task", tasks=[task], tags=["demo"])
    for name, path in general.items():
        lib.add(path, name=name, kind="general", tags=["demo"])
    print(
        f"  {len(lib.experts('kind=task'))} task + {len(lib.experts('kind=general'))} general "
        f"experts in {lib.path}"
    )

    # mttl's MBC, k by silhouette. Each task has a language of its own here, so expect weak clusters
    # (a low silhouette); a real library's related tasks cluster more clearly.
    clustering = lib.cluster("kind=task", seed=0)
    sil = "n/a" if clustering.silhouette is None else f"{clustering.silhouette:.2f}"
    print(
        f"  MBC clustering {clustering.record.name!r} ({clustering.record.metric} metric, "
        f"k = {clustering.record.k}, "
        f"silhouette {sil}):"
    )
    for c in clustering.record.clusters:
        print(f"    cluster {c.index}: {', '.join(c.members)}")
    lib.plot_clustering(clustering.record.name, out / "clusters.png")
    lib.plot_similarity(lib.similarity("kind=task", metric="delta"), out / "similarity.png")

    gks = lib.subtract_general(general="kind=general", experts="kind=task")  # PEFT's use_gks
    exact = lib.subtract_general(
        general="kind=general", experts="kind=task", mode="delta", rank=task_rank(lib), suffix="_dres"
    )
    print(
        f"  GenKnowSub residuals = task - mean({', '.join(gks.general)}): "
        f"{', '.join(gks.created)} (param mode), {', '.join(exact.created)} (ΔW mode)"
    )
    report = lib.compute_prototypes("kind=task,residual")
    print(f"  exact Arrow prototypes: {len(report.computed)} experts computed, {len(report.cached)} cached")
    return lib, {
        "experts": [e.name for e in lib.experts()],
        "clustering": {
            "name": clustering.record.name,
            "metric": clustering.record.metric,
            "k": clustering.record.k,
            "clusters": [list(c.members) for c in clustering.record.clusters],
        },
        "residuals": {"param": list(gks.created), "delta": list(exact.created)},
    }


def task_rank(lib: Library) -> int:
    """ΔW-mode residuals are truncated back to the task experts' rank."""
    return max(e.rank for e in lib.experts("kind=task"))


# --- step 4: Hub round trip ----------------------------------------------------------------------


class _Patch:
    """The ``setenv``/``setattr`` that ``tests.hubserver.patch_hf_client`` expects, with an undo."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setenv(self, key: str, value: str) -> None:
        old = os.environ.get(key)
        os.environ[key] = value

        def undo() -> None:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old

        self._undo.append(undo)

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name)
        setattr(obj, name, value)
        self._undo.append(lambda: setattr(obj, name, old))

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextmanager
def local_hub(home: Path) -> Iterator[str]:
    """The Hub stand-in on 127.0.0.1, this process's ``huggingface_hub`` pointed at it.

    ``huggingface_hub`` (imported with transformers) reads its endpoint at import time, so the
    environment alone is not enough in-process: ``patch_hf_client`` also patches its constants.
    """
    from tests.hubserver import HubServer, patch_hf_client

    patch = _Patch()
    with HubServer(user="demo") as server:
        patch_hf_client(patch, server.url, home)
        try:
            yield server.url
        finally:
            patch.undo()


def hub_round_trip(lib: Library, work: Path) -> tuple[Library, dict[str, Any]]:
    with local_hub(work / "hf_home") as url:
        lib.add_remote("origin", "demo/tiny-experts")
        pushed = lib.push("origin", message="tiny demo library", tag="v1")
        print(
            f"  push: {len(pushed.uploaded)} experts, {pushed.files_uploaded} files "
            f"({pushed.bytes_uploaded / 1e6:.2f} MB) -> {url}/demo/tiny-experts @ {pushed.commit[:8]}"
        )
        clone = Library.init(work / "clone")
        clone.add_remote("origin", "demo/tiny-experts")
        pulled = clone.pull("origin", revision="v1")
        status = clone.status("origin")
        print(
            f"  pull into {clone.path}: {len(pulled.added)} experts, {pulled.files_downloaded} files "
            f"(sha256-checked), {pulled.prototypes} prototype sets, {len(pulled.clusterings)} clusterings"
        )
        print(f"  status: {status.counts}")
    return clone, {
        "remote": "demo/tiny-experts",
        "commit": pushed.commit,
        "pushed_files": pushed.files_uploaded,
        "pulled_experts": sorted(pulled.added),
        "pulled_prototypes": pulled.prototypes,
        "status": dict(status.counts),
    }


# --- step 5: routing and accuracy ----------------------------------------------------------------


@dataclass
class Evaluation:
    """Held-out results of one model, per task; routing only for Arrow models."""

    token: dict[str, float]  # answer tokens right (teacher forced)
    exact: dict[str, float]  # whole answer right (= greedy decoding gives it)
    routing: dict[str, float] | None = None  # (token, module) pairs whose top-1 is the own expert
    routing_seq: dict[str, float] | None = None  # sequences whose majority top-1 is the own expert
    confusion: list[list[float]] | None = None  # task x expert: share of (token, module) top-1s
    confusion_seq: list[list[float]] | None = None  # task x expert: share of sequence majorities

    def mean(self, field: str) -> float:
        values = getattr(self, field)
        return sum(values.values()) / len(values)


def score(logits: Tensor, ids: Tensor) -> tuple[float, float]:
    """Answer-token accuracy under teacher forcing, and exact match: every answer token is the
    argmax given the right prefix exactly when greedy decoding produces the answer."""
    mask = answer_mask(ids)[:, :-1]
    right = (logits[:, :-1].argmax(-1) == ids[:, 1:]) | ~mask
    return right[mask].float().mean().item(), right.all(dim=1).float().mean().item()


@torch.no_grad()
def evaluate(
    model: Any, tokenizer: Any, held_out: dict[str, list[str]], task_of: dict[str, str] | None = None
) -> Evaluation:
    """Run each task's held-out batch; for a routed model (``task_of``: expert -> its task) also read
    which expert every token chose at every routed module, from ``explain()``."""
    tasks = list(held_out)
    token, exact, routing, routing_seq, confusion, confusion_seq = {}, {}, {}, {}, [], []
    for task, texts in held_out.items():
        ids = encode(tokenizer, texts)
        if task_of is None:
            logits = model(input_ids=ids).logits
        else:
            with model.explain() as trace:
                logits = model(input_ids=ids).logits
            votes = top1_votes(model, trace, tasks, task_of, ids.shape[0])
            own = tasks.index(task)
            routing[task] = (votes[:, own].sum() / votes.sum()).item()
            routing_seq[task] = (votes.argmax(-1) == own).float().mean().item()
            confusion.append((votes.sum(0) / votes.sum()).tolist())
            confusion_seq.append(
                (torch.bincount(votes.argmax(-1), minlength=len(tasks)) / len(texts)).tolist()
            )
        token[task], exact[task] = score(logits, ids)
    if task_of is None:
        return Evaluation(token, exact)
    return Evaluation(token, exact, routing, routing_seq, confusion, confusion_seq)


def top1_votes(model: Any, trace: Any, tasks: list[str], task_of: dict[str, str], n: int) -> Tensor:
    """(sequences, tasks): how many of a sequence's (token, module) pairs chose each task's expert
    as top-1. ``trace.tokens(module)`` lists the tokens of a (batch, seq) call batch-major."""
    column = torch.tensor([tasks.index(task_of[e]) for e in trace.experts])  # expert -> its task
    top1 = torch.stack([column[trace.tokens(m)[0][:, 0]] for m in model.layers])  # (modules, n * seq)
    per_sequence = top1.reshape(len(model.layers), n, -1).permute(1, 0, 2).reshape(n, -1)
    return nn.functional.one_hot(per_sequence, len(tasks)).sum(1)


ARROW_MODELS = {  # label -> catalog query of the routed experts
    "arrow": "kind=task",
    "arrow+gks": "kind=residual name=*_res",
    "arrow+gks(ΔW)": "kind=residual name=*_dres",
}


def route_and_evaluate(
    clone: Library, base: Path, tokenizer: Any, held_out: dict[str, list[str]], cfg: Settings, out: Path
) -> tuple[dict[str, Evaluation], dict[str, float]]:
    """Every model of the comparison, built from catalog queries on the clone."""
    from transformers import AutoModelForCausalLM

    task_of = {e.name: e.tasks[0] for e in clone.experts("kind=task,residual")}
    results = {"base": evaluate(AutoModelForCausalLM.from_pretrained(base).eval(), tokenizer, held_out)}

    single = [
        evaluate(clone.routed_model(base, experts=[t], top_k=1), tokenizer, {t: held_out[t]})
        for t in held_out
    ]  # the right expert alone: a router over that one expert
    results["oracle"] = Evaluation(
        {t: e.token[t] for t, e in zip(held_out, single, strict=True)},
        {t: e.exact[t] for t, e in zip(held_out, single, strict=True)},
    )

    n = len(clone.experts("kind=task"))  # every expert, equal weights: the uniform merge
    uniform = clone.routed_model(base, experts="kind=task", top_k=n, temperature=1e9)
    results["uniform"] = evaluate(uniform, tokenizer, held_out)

    routed = {}
    for label, query in ARROW_MODELS.items():
        routed[label] = clone.routed_model(base, experts=query, top_k=cfg.top_k)
        results[label] = evaluate(routed[label], tokenizer, held_out, task_of)

    mixed = encode(tokenizer, [texts[0] for texts in held_out.values()])  # one sequence per task
    with routed["arrow"].explain() as trace:  # libstore's own view: routing weight per module
        routed["arrow"](input_ids=mixed)
    trace.plot(out / "routing_by_module.png")

    # GenKnowSub on the fly (PEFT's use_gks) must equal routing over the stored residuals
    on_the_fly = clone.routed_model(base, experts="kind=task", general="kind=general", top_k=cfg.top_k)
    with torch.no_grad():
        diff = (on_the_fly(input_ids=mixed).logits - routed["arrow+gks"](input_ids=mixed).logits).abs().max()
    print(f"  GenKnowSub on the fly (general='kind=general') vs stored residuals: max |Δ logit| = {diff:.1e}")
    return results, {"gks_on_the_fly_vs_residuals_max_abs_diff": diff.item()}


# --- reporting -----------------------------------------------------------------------------------


def format_tables(results: dict[str, Evaluation], tasks: Sequence[str], cfg: Settings) -> str:
    w = max(11, *(len(t) + 2 for t in tasks))
    head = f"{'':<32}" + "".join(f"{t:>{w}}" for t in tasks) + f"{'mean':>{w}}"
    title = (
        f"Routing accuracy: top-1 expert is the task's own (top_k = {cfg.top_k}, "
        f"chance = {1 / len(tasks):.2f})"
    )
    lines = [title, head]
    for label in ARROW_MODELS:
        ev = results[label]
        for field, what in (("routing", "tokens x modules"), ("routing_seq", "sequences")):
            row = getattr(ev, field)
            lines.append(
                f"{label + ', ' + what:<32}"
                + "".join(f"{row[t]:>{w}.2f}" for t in tasks)
                + f"{ev.mean(field):>{w}.2f}"
            )
    lines += ["", "Held-out accuracy: answer tokens / exact match of the whole answer", head]
    for label, ev in results.items():
        cells = [f"{ev.token[t]:.2f}/{ev.exact[t]:.2f}" for t in tasks]
        cells.append(f"{ev.mean('token'):.2f}/{ev.mean('exact'):.2f}")
        lines.append(f"{label:<32}" + "".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)


def plot_confusion(results: dict[str, Evaluation], tasks: Sequence[str], path: Path) -> Path:
    """Rows: the Arrow models; columns: per (token, module) and per sequence (majority)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(tasks)
    fig = Figure(figsize=(9.5, 3.9 * len(ARROW_MODELS)))
    FigureCanvasAgg(fig)
    for i, label in enumerate(ARROW_MODELS):
        ev = results[label]
        for j, (mat, acc, what) in enumerate(
            (
                (ev.confusion, ev.mean("routing"), "tokens x modules"),
                (ev.confusion_seq, ev.mean("routing_seq"), "sequences, majority"),
            )
        ):
            ax = fig.add_subplot(len(ARROW_MODELS), 2, 2 * i + j + 1)
            m = torch.tensor(mat)
            im = ax.imshow(m.numpy(), vmin=0, vmax=1, cmap="Blues")
            for r in range(n):
                for c in range(n):
                    ax.text(
                        c,
                        r,
                        f"{m[r, c]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if m[r, c] > 0.55 else "black",
                    )
            ax.set_xticks(range(n), [f"{t} expert" for t in tasks], rotation=35, ha="right", fontsize=7)
            ax.set_yticks(range(n), tasks, fontsize=7)
            ax.set_ylabel("held-out task", fontsize=8)
            ax.set_title(f"{label}: {what}\nrouting accuracy {acc:.2f}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_accuracy(results: dict[str, Evaluation], tasks: Sequence[str], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2 + 1.2 * (len(tasks) + 1), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(results)
    for j, (label, ev) in enumerate(results.items()):
        values = [ev.exact[t] for t in tasks] + [ev.mean("exact")]
        ax.bar([i + j * width for i in range(len(values))], values, width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks) + 1)], [*tasks, "mean"])
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def to_json(results: dict[str, Evaluation]) -> dict[str, Any]:
    routing = {
        label: {
            "token": ev.routing,
            "token_mean": ev.mean("routing"),
            "sequence": ev.routing_seq,
            "sequence_mean": ev.mean("routing_seq"),
            "confusion": ev.confusion,
            "confusion_sequence": ev.confusion_seq,
        }
        for label, ev in results.items()
        if ev.routing is not None
    }
    accuracy = {
        label: {
            "token": ev.token,
            "exact": ev.exact,
            "token_mean": ev.mean("token"),
            "exact_mean": ev.mean("exact"),
        }
        for label, ev in results.items()
    }
    return {"routing_accuracy": routing, "accuracy": accuracy}


# --- main ----------------------------------------------------------------------------------------


@contextmanager
def step(title: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"\n== {title}", flush=True)
    t0 = time.perf_counter()
    yield
    timings[title] = round(time.perf_counter() - t0, 2)
    print(f"   ({timings[title]:.1f} s)", flush=True)


def setup(seed: int) -> None:
    """Seed everything; one thread (a tiny model is bound by per-op overhead, and a second thread
    only fights other processes for the cores); no progress bars or warnings but ours."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside PEFT/transformers
    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # transformers' and huggingface_hub's


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        help="folder for the PNGs, results.json and work files (default: ./demo-output)",
    )
    parser.add_argument("--quick", action="store_true", help="4 tasks and fewer steps: a smoke run")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    cfg = Settings.make(args.quick)
    out = args.out.resolve()
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    setup(args.seed)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    held_out = held_out_inputs(cfg.tasks, cfg.held_out, cfg.length, args.seed)
    exclude = {s for texts in held_out.values() for s in texts}

    with step("1. tokenizer + tiny Llama, pre-trained on general data", timings):
        base, tokenizer = pretrain_base(work, cfg, exclude)
    with step(f"2. {len(cfg.tasks)} task LoRAs + {cfg.n_general} general LoRAs (PEFT)", timings):
        adapters, general = train_experts(base, tokenizer, work, cfg, exclude)
    with step("3. library: catalog, MBC clustering, GenKnowSub residuals, Arrow prototypes", timings):
        lib, library = build_library(work, base, adapters, general, out)
    with step("4. push to the Hub stand-in, pull into a fresh library", timings):
        clone, hub = hub_round_trip(lib, work)
    with step("5. routed models from the clone, on held-out inputs", timings):
        results, checks = route_and_evaluate(clone, base, tokenizer, held_out, cfg, out)
        pngs = [
            plot_confusion(results, cfg.tasks, out / "routing_confusion.png"),
            plot_accuracy(results, cfg.tasks, out / "accuracy.png"),
            out / "routing_by_module.png",
            out / "clusters.png",
            out / "similarity.png",
        ]
    timings["total"] = round(time.perf_counter() - start, 2)

    table = format_tables(results, cfg.tasks, cfg)
    print(f"\n{table}")
    report = {
        "settings": {**asdict(cfg), "quick": args.quick, "seed": args.seed},
        "tasks": list(cfg.tasks),
        "library": library,
        "hub": hub,
        **to_json(results),
        "checks": checks,
        "table": table,
        "pngs": [str(p) for p in pngs],
        "timings_s": timings,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    lib.close()
    clone.close()
    print(f"\nDone in {timings['total']:.0f} s. Written to {out}:")
    for p in [*pngs, out / "results.json"]:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
