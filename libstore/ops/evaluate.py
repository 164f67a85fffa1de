"""Evaluate routers on held-out examples and keep the results in the catalog (``libstore eval``).

Input: a JSONL file, one example per line: ``{"input": str, "target": str, "task": str | null}``
(other keys are ignored), a catalog query selecting the experts, and router specs
(:mod:`libstore.ops.routers`: ``arrow``, ``arrow:top_n=2``, ``spectr``, ``uniform``, ``oracle``,
``...;granularity=sequence``, ``...;general=QUERY``).

Per router, every example is tokenized as ``tokens(input) + tokens(target)`` (the target tokenized
alone, without special tokens) and run once, teacher forced:

- **loss**: mean cross-entropy per target token;
- **exact match**: every target token is the argmax given the right prefix — exactly when greedy
  decoding produces the target;
- **routing accuracy** (examples whose ``task`` some routed expert lists in its tasks — its *own*
  experts): the share of (token, routed module) pairs whose top-1 expert is an own expert, and the
  share of sequences whose majority top-1 expert over all their (token, module) pairs is one.

``granularity=sequence`` routes each example once from its input's tokens (a forward over the input
alone decides, as a generation's prefill would), then runs input + target with those experts.
``oracle`` sends each example to its task's own expert(s) in every module (:meth:`RoutedModel.pinned`);
``uniform`` averages every expert. Neither chooses, so neither has a routing accuracy.

Each run is recorded (:mod:`libstore.catalog.evals`) with the data file's sha256 and every expert's
weights sha256; ``evals ls/show`` mark it stale once an expert changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from libstore.catalog import evals as cat
from libstore.catalog.evals import Evaluation
from libstore.errors import NotFoundError, ValidationError
from libstore.ops import route
from libstore.ops.context import Context
from libstore.ops.experts import get_base
from libstore.ops.query import format_query, parse_query
from libstore.ops.routers import parse_spec
from libstore.ops.select import resolve_experts
from libstore.types import (
    EVAL_METRICS,
    ClusteringInput,
    EvalMetrics,
    EvalRecord,
    Expert,
    ExpertQuery,
    PrototypeMethod,
    RouterName,
    RouterSpec,
)

if TYPE_CHECKING:
    import torch

    from libstore.router.model import RoutedModel

__all__ = [
    "ALL",
    "METRICS",
    "Comparison",
    "Evaluation",
    "Example",
    "compare",
    "evaluate",
    "evaluation",
    "evaluations",
    "plot",
    "read_examples",
    "remove",
]

ALL = "all"
"""The key of the overall metrics, next to one key per task."""
METRICS = EVAL_METRICS
MAX_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class Example:
    """One held-out example: the text given, the text expected after it, and its task (if known)."""

    input: str
    target: str
    task: str | None = None


def read_examples(path: str | os.PathLike[str]) -> tuple[list[Example], str]:
    """The examples of a JSONL file and the sha256 of its bytes.

    Raises:
        ValidationError: unreadable file, a line that is not a JSON object with non-empty string
            ``input`` and ``target`` (and a string or null ``task``), or no example at all.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_DATA_BYTES:
            raise ValidationError(f"{p} has {size} bytes, more than {MAX_DATA_BYTES}", path=str(p))
        data = p.read_bytes()
    except OSError as e:
        raise ValidationError(f"cannot read the examples file {p}: {e.strerror or e}", path=str(p)) from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValidationError(f"{p} is not UTF-8 text", path=str(p)) from e
    out: list[Example] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValidationError(f"{p}:{n}: not JSON ({e.msg})", path=str(p), field=where) from e
        if not isinstance(obj, dict):
            raise ValidationError(f"{p}:{n}: expected a JSON object", path=str(p), field=where)
        ex_in, target, task = obj.get("input"), obj.get("target"), obj.get("task")
        if not isinstance(ex_in, str) or not ex_in or not isinstance(target, str) or not target:
            raise ValidationError(
                f"{p}:{n}: 'input' and 'target' must be non-empty strings", path=str(p), field=where
            )
        if task is not None and not isinstance(task, str):
            raise ValidationError(f"{p}:{n}: 'task' must be a string or null", path=str(p), field=where)
        out.append(Example(ex_in, target, task or None))
    if not out:
        raise ValidationError(f"{p} holds no examples (one JSON object per line)", path=str(p))
    return out, hashlib.sha256(data).hexdigest()


# --- running -------------------------------------------------------------------------------------


@dataclass
class _Row:
    """Per example, what one router gave."""

    task: str | None
    loss: float
    tokens: int
    exact: bool
    hits: int | None = None  # (token, module) pairs whose top-1 is an own expert
    pairs: int | None = None
    majority: bool | None = None


DEFAULT_ROUTERS = ("arrow", "spectr", "uniform")


@dataclass(frozen=True)
class EvalOptions:
    """The options of ``libstore eval`` and ``Library.evaluate``; see :func:`evaluate`."""

    experts: str | ExpertQuery = "kind=task"
    routers: tuple[str | RouterSpec, ...] = DEFAULT_ROUTERS
    top_k: int = 3
    temperature: float = 1.0
    batch_size: int = 32
    name: str | None = None
    record: bool = True
    device: str | None = None
    allow_base_mismatch: bool = False


def evaluate(
    ctx: Context,
    data: str | os.PathLike[str],
    *,
    options: EvalOptions,
    base: Any = None,
    tokenizer: Any = None,
) -> EvalRecord:
    """Run every router on every example and return (and, with ``record``, store) the results.

    Args (``data``, ``base``, ``tokenizer``, then the fields of ``options``):
        base: a model folder or Hub id, a loaded ``PreTrainedModel`` (then ``tokenizer`` is needed),
            or ``None`` for the base model's registered source.
        tokenizer: default: ``AutoTokenizer`` of the base folder / source.
        top_k, temperature: defaults for routers whose spec does not set them.
        name: the evaluation's name (default ``eval-N``).
    """
    o = options
    experts, routers, top_k, temperature, batch_size = (
        o.experts,
        o.routers,
        o.top_k,
        o.temperature,
        o.batch_size,
    )
    name, record, device, allow_base_mismatch = o.name, o.record, o.device, o.allow_base_mismatch
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValidationError(
            f"batch_size must be a positive integer, got {batch_size!r}", field="batch_size"
        )
    examples, data_sha = read_examples(data)
    specs = [parse_spec(r) for r in routers]
    labels = [s.label for s in specs]
    if not specs or len(set(labels)) != len(labels):
        raise ValidationError(f"give one or more distinct routers, got {labels}", field="router")
    query = parse_query(experts)
    chosen = resolve_experts(ctx, query)
    base_name = chosen[0].base_model
    own = _own_experts(chosen, examples)
    if any(s.name == "oracle" for s in specs):
        lost = [i for i, o in enumerate(own) if not o]
        if lost:
            raise ValidationError(
                f"'oracle' needs every example's task to be a task of a routed expert; example "
                f"{lost[0] + 1} has task {examples[lost[0]].task!r}",
                path=str(data),
                field="task",
            )
    tok = tokenizer if tokenizer is not None else _tokenizer(base, get_base(ctx, base_name).source)
    encoded = [_encode(tok, ex, i) for i, ex in enumerate(examples)]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    metrics: dict[str, dict[str, EvalMetrics]] = {}
    model: Any = base
    for spec in specs:
        routed = _build(ctx, spec, model, query, top_k, temperature, device, allow_base_mismatch)
        try:
            rows = _run(routed, spec, examples, encoded, own, pad, batch_size)
        finally:
            model = routed.unpatch()
        metrics[spec.label] = _aggregate(rows)
    rec = EvalRecord(
        name=name or "",
        base_model=base_name,
        query=format_query(query),
        data_path=str(data),
        data_sha256=data_sha,
        examples=len(examples),
        tasks=tuple(sorted({ex.task for ex in examples if ex.task})),
        routers=tuple(labels),
        params={
            "top_k": top_k,
            "temperature": temperature,
            "batch_size": batch_size,
            "base": base if isinstance(base, str) else (None if base is None else type(base).__name__),
        },
        experts=tuple(ClusteringInput(e.name, e.sha256) for e in chosen),
        metrics=metrics,
    )
    if not record:
        return rec
    with ctx.catalog.write() as s:
        rec = dataclasses.replace(rec, name=name or cat.next_name(s))
        return cat.insert(s, rec)


def _tokenizer(base: Any, source: str) -> Any:
    from transformers import AutoTokenizer

    if base is not None and not isinstance(base, str | os.PathLike):
        raise ValidationError("a loaded base model needs its tokenizer: pass tokenizer=", field="tokenizer")
    where = str(base) if base is not None else source
    try:
        return AutoTokenizer.from_pretrained(where)
    except OSError as e:
        raise ValidationError(f"cannot load a tokenizer from {where!r}: {e}", field="tokenizer") from e


def _encode(tok: Any, ex: Example, i: int) -> tuple[list[int], list[int]]:
    a = list(tok(ex.input)["input_ids"])
    b = list(tok(ex.target, add_special_tokens=False)["input_ids"])
    if not a or not b:
        raise ValidationError(f"example {i + 1}: its input or target has no tokens", field=f"example {i + 1}")
    return a, b


def _own_experts(chosen: Sequence[Expert], examples: Sequence[Example]) -> list[list[int]]:
    """Per example, the indices of the routed experts that list its task (empty: none or no task)."""
    by_task: dict[str, list[int]] = {}
    for j, e in enumerate(chosen):
        for t in e.tasks:
            by_task.setdefault(t, []).append(j)
    return [list(by_task.get(ex.task, ())) if ex.task else [] for ex in examples]


def _build(
    ctx: Context,
    spec: RouterSpec,
    model: Any,
    query: ExpertQuery,
    top_k: int,
    temperature: float,
    device: str | None,
    allow_base_mismatch: bool,
) -> RoutedModel:
    p = spec.params
    # check_spec made the name one of ROUTER_NAMES or "oracle", and the method one of Arrow's
    router = cast(RouterName, "uniform" if spec.name == "oracle" else spec.name)
    return route.routed_model(
        ctx,
        base=model,
        experts=query,
        router=router,
        top_k=int(p.get("top_k", top_k)),
        temperature=float(p.get("temperature", temperature)),
        general=p.get("general"),
        top_n=int(p.get("top_n", 1)),
        method=cast(PrototypeMethod, p.get("method", "exact")),
        seed=int(p.get("seed", 0)),
        device=device,
        allow_base_mismatch=allow_base_mismatch,
    )


def _run(
    routed: RoutedModel,
    spec: RouterSpec,
    examples: Sequence[Example],
    encoded: Sequence[tuple[list[int], list[int]]],
    own: Sequence[list[int]],
    pad: int,
    batch_size: int,
) -> list[_Row]:
    import torch

    dev = next(routed.model.parameters()).device
    chooses = spec.name not in ("oracle", "uniform")
    per_sequence = spec.params.get("granularity", "token") == "sequence"
    rows: list[_Row] = []
    with torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            idx = list(range(start, min(start + batch_size, len(examples))))
            full, mask = _pad([encoded[i][0] + encoded[i][1] for i in idx], pad, dev)
            if spec.name == "oracle":
                names = [[routed.experts[j] for j in own[i]] for i in idx]
                with routed.pinned(names), routed.explain() as trace:
                    logits = routed.model(input_ids=full, attention_mask=mask).logits
            elif per_sequence:
                prompt, pmask = _pad([encoded[i][0] for i in idx], pad, dev)
                with routed.sequence_routing(pmask) as routes:
                    routed.model(input_ids=prompt, attention_mask=pmask)
                with routed.pinned(routes), routed.explain() as trace:
                    logits = routed.model(input_ids=full, attention_mask=mask).logits
            else:
                with routed.explain() as trace:
                    logits = routed.model(input_ids=full, attention_mask=mask).logits
            tops = (
                torch.stack([trace.tokens(m)[0][:, 0] for m in routed.layers]).view(
                    len(routed.layers), len(idx), -1
                )
                if chooses
                else None
            )
            logp = torch.log_softmax(logits.float(), dim=-1)
            for b, i in enumerate(idx):
                a_len, t_len = len(encoded[i][0]), len(encoded[i][1])
                pos = torch.arange(a_len - 1, a_len + t_len - 1, device=logits.device)
                target = full[b, a_len : a_len + t_len]
                nll = -logp[b, pos, target].sum().item()
                exact = bool((logits[b, pos].argmax(-1) == target).all())
                row = _Row(examples[i].task, nll, t_len, exact)
                if tops is not None and own[i]:
                    top = tops[:, b, : a_len + t_len].reshape(-1)
                    mine = torch.tensor(own[i])
                    row.hits = int(torch.isin(top, mine).sum())
                    row.pairs = int(top.numel())
                    row.majority = int(torch.bincount(top, minlength=len(routed.experts)).argmax()) in own[i]
                rows.append(row)
    return rows


def _pad(seqs: Sequence[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (n, L) and their attention mask."""
    import torch

    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def _aggregate(rows: Sequence[_Row]) -> dict[str, EvalMetrics]:
    groups: dict[str, list[_Row]] = {ALL: list(rows)}
    for r in rows:
        if r.task:
            groups.setdefault(r.task, []).append(r)
    out = {}
    for key in [ALL, *sorted(k for k in groups if k != ALL)]:
        g = groups[key]
        tokens = sum(r.tokens for r in g)
        scored = [r for r in g if r.pairs]
        out[key] = EvalMetrics(
            examples=len(g),
            tokens=tokens,
            loss=sum(r.loss for r in g) / tokens,
            exact_match=sum(r.exact for r in g) / len(g),
            routing_token=(
                sum(r.hits or 0 for r in scored) / sum(r.pairs or 0 for r in scored) if scored else None
            ),
            routing_sequence=sum(bool(r.majority) for r in scored) / len(scored) if scored else None,
        )
    return out


# --- reading, comparing, plotting ----------------------------------------------------------------


def evaluations(ctx: Context) -> list[Evaluation]:
    """Every recorded evaluation, oldest first, with the current state of its experts."""
    with ctx.catalog.read() as s:
        return cat.all_evaluations(s)


def evaluation(ctx: Context, name: str) -> Evaluation:
    with ctx.catalog.read() as s:
        return cat.get(s, name)


def remove(ctx: Context, name: str) -> None:
    with ctx.catalog.write() as s:
        cat.delete(s, name)


@dataclass(frozen=True)
class Comparison:
    """Evaluations side by side: one row per (router, task), one value per evaluation.

    Attributes:
        names: the evaluations, in the order given (the value columns).
        metric: the metric compared.
        rows: (router label, task or ``"all"``, values); a value is ``None`` where an evaluation
            has no such router, task or metric.
        notes: what differs between them beyond routers (data, experts, base model, staleness).
    """

    names: tuple[str, ...]
    metric: str
    rows: tuple[tuple[str, str, tuple[float | None, ...]], ...]
    notes: tuple[str, ...]


def compare(ctx: Context, names: Sequence[str], *, metric: str = "exact_match") -> Comparison:
    """Line up recorded evaluations on one metric (``exact_match``, ``loss``, ``routing_token``,
    ``routing_sequence``)."""
    if metric not in METRICS:
        raise ValidationError(f"unknown metric {metric!r}; metrics are {', '.join(METRICS)}", field="metric")
    if len(names) < 1:
        raise ValidationError("name at least one evaluation", field="name")
    with ctx.catalog.read() as s:
        views = [cat.get(s, n) for n in names]
    recs = [v.record for v in views]
    keys: list[tuple[str, str]] = []
    for r in recs:
        for label in r.routers:
            for task in r.metrics.get(label, {}):
                if (label, task) not in keys:
                    keys.append((label, task))
    rows = tuple((label, task, tuple(_value(r, label, task, metric) for r in recs)) for label, task in keys)
    notes: list[str] = []
    first = recs[0]
    for v in views:
        r = v.record
        if r.data_sha256 != first.data_sha256:
            notes.append(f"{r.name}: other data ({r.data_path}, sha256 {r.data_sha256[:12]})")
        if {(e.name, e.sha256) for e in r.experts} != {(e.name, e.sha256) for e in first.experts}:
            notes.append(f"{r.name}: other experts (query {r.query!r})")
        if r.base_model != first.base_model:
            notes.append(f"{r.name}: other base model {r.base_model!r}")
        if v.stale:
            notes.append(f"{r.name}: stale ({'; '.join(v.stale_reasons[:3])})")
    return Comparison(tuple(r.name for r in recs), metric, rows, tuple(notes))


def _value(rec: EvalRecord, label: str, task: str, metric: str) -> float | None:
    m = rec.metrics.get(label, {}).get(task)
    value = getattr(m, metric) if m is not None else None
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def plot(rec: EvalRecord, path: str | os.PathLike[str], *, metric: str = "exact_match") -> Path:
    """A heatmap of one metric, routers (rows) x tasks and ``all`` (columns), values written in."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if metric not in METRICS:
        raise ValidationError(f"unknown metric {metric!r}; metrics are {', '.join(METRICS)}", field="metric")
    cols = [*rec.tasks, ALL]
    grid = [[_value(rec, label, c, metric) for c in cols] for label in rec.routers]
    if not rec.routers:
        raise NotFoundError(f"evaluation {rec.name!r} has no results", what="evaluation", name=rec.name)
    shown = [[float("nan") if v is None else v for v in row] for row in grid]
    fig = Figure(figsize=(min(2.5 + 1.1 * len(cols), 30), min(1.5 + 0.45 * len(rec.routers), 30)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lower_better = metric == "loss"
    im = ax.imshow(shown, aspect="auto", cmap="viridis_r" if lower_better else "viridis")
    fig.colorbar(im, ax=ax)
    known = [v for row in grid for v in row if v is not None]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    for r, row in enumerate(grid):
        for c, v in enumerate(row):  # dark ink on light cells (imshow scales colours to lo..hi)
            red, green, blue, _ = im.cmap((v - lo) / ((hi - lo) or 1.0)) if v is not None else (1, 1, 1, 1)
            ink = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            ax.text(c, r, "–" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=7, color=ink)
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right", fontsize=7)
    ax.set_yticks(range(len(rec.routers)), list(rec.routers), fontsize=7)
    ax.set_title(f"{rec.name}: {metric} per router and task ({rec.examples} examples)", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out
